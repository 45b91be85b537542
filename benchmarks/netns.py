"""A throttled network for p ranks on one Linux machine: namespaces, veth pairs, a bridge, tc.

``Testbed(p, rate="100mbit")`` gives each rank a network namespace ``<prefix>n<i>`` with one
veth end (address ``10.77.0.<i+1>/24``) whose other end hangs on a bridge in the root
namespace. Every rank's egress is shaped by a token bucket (``tc qdisc ... tbf``; ``netem``
is not built into these kernels), so each rank sends at most ``rate``: the per-link
bandwidth of the alpha-beta model. Segmentation offloads are turned off so the shaper sees
wire-sized packets.

Everything created carries the prefix ``scb``; ``Testbed.__exit__`` removes it all, also on
an exception, and ``sweep()`` removes leftovers of a run that was killed. Needs root.
"""
from __future__ import annotations

import os
import shutil
import subprocess

PREFIX = "scb"
SUBNET = "10.77.0"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def need_root() -> str | None:
    """Why this machine cannot build a testbed, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the '{tool}' command (iproute2)"
    return None


def sweep() -> None:
    """Remove every namespace and link with our prefix (from a run that was killed)."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            sh("ip", "netns", "delete", name, check=False)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(PREFIX):
            sh("ip", "link", "delete", name, check=False)


def _burst_bytes(rate_bits: float) -> int:
    # tbf needs a bucket of at least rate/HZ; 4 ms of traffic (and no less than 32 KiB)
    # keeps the shaper accurate at 100 Mbit/s and at 1 Gbit/s.
    return max(32 * 1024, int(rate_bits / 8 * 0.004))


def parse_rate(text: str) -> float:
    """'100mbit' -> 1e8 bits per second (tc's units: kbit, mbit, gbit)."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if text.lower().endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(f"rate {text!r}: use a number with kbit, mbit or gbit")


class Testbed:
    def __init__(self, world_size: int, rate: str):
        self.world_size, self.rate = world_size, rate
        self.rate_bits = parse_rate(rate)
        self.bridge = f"{PREFIX}br"

    def namespace(self, rank: int) -> str:
        return f"{PREFIX}n{rank}"

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"

    def device(self, rank: int) -> str:
        """The rank's interface inside its namespace (for GLOO_SOCKET_IFNAME)."""
        return f"{PREFIX}p{rank}"

    def exec_prefix(self, rank: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(rank)]

    def __enter__(self) -> Testbed:
        sweep()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for rank in range(self.world_size):
            sh("ip", "netns", "delete", self.namespace(rank), check=False)
        sh("ip", "link", "delete", self.bridge, check=False)
        sweep()

    def _build(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        burst = _burst_bytes(self.rate_bits)
        for rank in range(self.world_size):
            ns, dev, host = self.namespace(rank), self.device(rank), f"{PREFIX}h{rank}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", dev)
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "link", "set", host, "master", self.bridge, "up")
            inside = ["ip", "netns", "exec", ns]
            sh(*inside, "ip", "addr", "add", f"{self.address(rank)}/24", "dev", dev)
            sh(*inside, "ip", "link", "set", dev, "up")
            sh(*inside, "ip", "link", "set", "lo", "up")
            if shutil.which("ethtool"):
                sh(*inside, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off",
                   check=False)
            sh(*inside, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
               "burst", str(burst), "latency", "100ms")
