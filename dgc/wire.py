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
