"""Bytes a rank puts on the wire for one collective, following the ring algorithms.

nccl-tests' performance notes (doc/PERFORMANCE.md) give the per-rank traffic of the ring
algorithms: an allreduce of S bytes sends 2(p-1)/p * S per rank, and an allgather in which
each rank contributes S bytes sends (p-1) * S per rank. Callers pass the byte size of the
tensor actually handed to the collective, measured at the call.
"""


def allreduce_bytes(nbytes: int, world_size: int) -> float:
    """Per-rank wire bytes of a ring allreduce of an ``nbytes`` tensor."""
    return 2.0 * (world_size - 1) / world_size * nbytes


def allgather_bytes(nbytes_per_rank: int, world_size: int) -> float:
    """Per-rank wire bytes of a ring allgather where each rank contributes ``nbytes_per_rank``."""
    return float((world_size - 1) * nbytes_per_rank)


def reduce_scatter_bytes(nbytes: int, world_size: int) -> float:
    """Per-rank wire bytes of a ring reduce-scatter of an ``nbytes`` tensor: (p-1)/p of it,
    half an allreduce."""
    return (world_size - 1) / world_size * nbytes


def all_to_all_bytes(nbytes: int, world_size: int) -> float:
    """Per-rank wire bytes of an all-to-all of an ``nbytes`` buffer cut into one equal
    chunk per rank: every chunk but a rank's own leaves it."""
    return (world_size - 1) / world_size * nbytes


def ring_link_split(wire_bytes: float, world_size: int, nodes: int) -> tuple[float, float]:
    """(intra-node, inter-node) shares of a ring collective's per-rank ``wire_bytes`` over
    ``world_size`` ranks placed node by node on ``nodes`` nodes: each rank sends to the next,
    so of the ring's ``world_size`` hops ``nodes`` cross from one node to the next (none on
    one node). Averaged over the ranks, that fraction of every rank's bytes is inter-node."""
    if nodes <= 1:
        return wire_bytes, 0.0
    inter = wire_bytes * nodes / world_size
    return wire_bytes - inter, inter


def account(stats, wire_bytes: float, world_size: int, nodes: int = 1,
            link: str = "world") -> None:
    """Add one collective's per-rank ``wire_bytes`` to ``stats`` (any object with
    ``bytes_sent``, ``bytes_intra`` and ``bytes_inter``): inside one node (``"intra"``),
    one rank per node (``"inter"``), or a ring over ``nodes`` whole nodes (``"world"``)."""
    if link == "intra":
        intra, inter = wire_bytes, 0.0
    elif link == "inter":
        intra, inter = 0.0, wire_bytes
    else:
        intra, inter = ring_link_split(wire_bytes, world_size, nodes)
    stats.bytes_sent += wire_bytes
    stats.bytes_intra += intra
    stats.bytes_inter += inter
