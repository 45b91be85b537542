"""A throttled network for p ranks on one Linux machine: namespaces, veth pairs, a bridge, tc.

``Testbed(p, rate="100mbit")`` gives each rank a network namespace with one veth end
(address ``10.77.0.<rank+1>/24``) whose other end hangs on a bridge in the root namespace.
Every rank's egress is shaped by a token bucket (``tc qdisc ... tbf``; ``netem`` is not
built into these kernels), so each rank sends at most ``rate``: the per-rank link of the
alpha-beta model, with the bridge as a non-blocking switch. Only the namespaces' own
addresses and loopback are reachable from inside; the root namespace has no address on the
bridge, so nothing is routed out.

Every name starts with ``sclb<pid>``, the pid of the process that built it:
``Testbed.close`` (also run by ``__exit__`` on an exception or Ctrl-C) removes everything
it made, and ``sweep()`` removes what a killed run left behind (names whose pid is no
longer alive), never a live run's. Needs root.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

PREFIX = "sclb"
SUBNET = "10.77.0"
# sclb<pid><kind><rank>: n namespace, h root-side veth, p rank-side veth; sclb<pid>br bridge.
# Interface names are at most 15 characters: 4 + 7 (pid) + 1 + 3 at most.
_NAME = re.compile(rf"^{PREFIX}(\d+)(?:br|[nhp]\d+)$")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def need_root() -> str | None:
    """Why this machine cannot build a testbed, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the '{tool}' command (iproute2)"
    probe = f"{PREFIX}{os.getpid()}n999"  # root in a container may still lack CAP_NET_ADMIN
    made = sh("ip", "netns", "add", probe, check=False)
    sh("ip", "netns", "delete", probe, check=False)
    if made.returncode != 0:
        return f"cannot create network namespaces here ({made.stderr.strip()})"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ours(names: list[str], stale_only: bool) -> list[str]:
    keep = []
    for name in names:
        match = _NAME.match(name)
        if match and not (stale_only and _alive(int(match.group(1)))):
            keep.append(name)
    return keep


def namespaces() -> list[str]:
    lines = sh("ip", "netns", "list", check=False).stdout.splitlines()
    return [line.split()[0] for line in lines if line.split()]


def links() -> list[str]:
    out = sh("ip", "-o", "link", "show", check=False).stdout.splitlines()
    return [line.split(":")[1].strip().split("@")[0] for line in out if ":" in line]


def sweep() -> list[str]:
    """Remove the namespaces and links of testbeds whose process is gone; their names."""
    gone = _ours(namespaces(), stale_only=True) + _ours(links(), stale_only=True)
    for name in gone:
        kind = "netns" if name in namespaces() else "link"
        sh("ip", kind, "delete", name, check=False)
    return gone


def parse_rate(text: str) -> float:
    """'100mbit' -> 1e8 bits per second (tc's units: kbit, mbit, gbit)."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if text.lower().endswith(unit):
            try:
                return float(text[: -len(unit)]) * scale
            except ValueError:
                break
    raise ValueError(f"rate {text!r}: use a number with kbit, mbit or gbit, e.g. 100mbit")


def burst_bytes(rate_bits: float) -> int:
    """tbf's bucket: what a rank may send at once after an idle spell.

    A wire has no such bucket, so it is kept small: 1.25 ms of traffic, 16 KiB at least.
    Smaller ones starve the shaper: here a 64 KiB bucket (0.5 ms) let a 16 MB allreduce
    through at less than half of 1 Gbit/s, 128 KiB did not. The cost model knows the bucket
    (``burst_kbytes`` of the netns presets in configs/hardware/links.yaml)."""
    return max(16 * 1024, int(rate_bits / 8 * 0.00125))


class Testbed:
    """``ranks_per_node`` ranks share each namespace (a node): they talk to each other over
    the namespace's own stack, unshaped, and to other nodes through the node's one shaped
    veth, which they share, as the ranks of a server share its NIC."""

    def __init__(self, world_size: int, rate: str, burst: int | None = None,
                 ranks_per_node: int = 1, idle_slow_start: bool = True):
        if world_size % ranks_per_node:
            raise ValueError(f"{ranks_per_node} ranks per node do not divide {world_size}")
        self.world_size, self.rate, self.ranks_per_node = world_size, rate, ranks_per_node
        self.rate_bits = parse_rate(rate)
        self.burst = burst_bytes(self.rate_bits) if burst is None else burst
        # False: TCP keeps a connection's window over idle spells (Linux's
        # net.ipv4.tcp_slow_start_after_idle = 0 inside every namespace)
        self.idle_slow_start = idle_slow_start
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}br"
        self._made: list[tuple[str, str]] = []  # ("netns" | "link", name), in creation order

    @property
    def nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def node(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def namespace(self, rank: int) -> str:
        return f"{self.tag}n{self.node(rank)}"

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{self.node(rank) + 1}"

    def device(self, rank: int) -> str:
        """The rank's interface inside its namespace (for GLOO_SOCKET_IFNAME)."""
        return f"{self.tag}p{self.node(rank)}"

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
        """Delete what this testbed made (a namespace takes its veth end with it)."""
        for kind, name in reversed(self._made):
            sh("ip", kind, "delete", name, check=False)
        self._made.clear()
        left = _ours(namespaces(), stale_only=False) + _ours(links(), stale_only=False)
        for name in [n for n in left if n.startswith(self.tag)]:
            sh("ip", "netns" if name in namespaces() else "link", "delete", name, check=False)

    def _add(self, kind: str, name: str, *args: str) -> None:
        self._made.append((kind, name))
        sh("ip", kind, "add", name, *args)

    def _build(self) -> None:
        self._add("link", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        for rank in range(0, self.world_size, self.ranks_per_node):  # one per node
            ns, dev = self.namespace(rank), self.device(rank)
            host = f"{self.tag}h{self.node(rank)}"
            self._add("netns", ns)
            self._add("link", host, "type", "veth", "peer", "name", dev)
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "link", "set", host, "master", self.bridge, "up")
            inside = ["ip", "netns", "exec", ns]
            sh(*inside, "ip", "addr", "add", f"{self.address(rank)}/24", "dev", dev)
            sh(*inside, "ip", "link", "set", dev, "up")
            sh(*inside, "ip", "link", "set", "lo", "up")
            sh(*inside, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
               "burst", str(self.burst), "latency", "100ms")
            if not self.idle_slow_start:
                sh(*inside, "sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0")
