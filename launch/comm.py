"""The baselines' communication hooks: DDP's allreduce and torch's compression hooks, with
their wire bytes counted.

Registering this instead of DDP's built-in allreduce changes nothing numerically (both
average the bucket with one allreduce) but lets every run report ``comm_bytes_sent`` the
same way, counted at the collective call.

With a sparsifier whose masks are fixed (N:M, an IHT sparse phase, a finished magnitude
schedule: the same on every rank), only the live entries of the masked tensors travel,
without indices, and the receiver puts them back in place: a 2:4 model sends half the
dense bytes. The masked entries would be zeroed before the optimizer step anyway.
"""

import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powerSGD

from dgc.wire import account, allreduce_bytes
from sparse_train.live import GradientMasks, gather_live, scatter_live_


@dataclass
class AllreduceStats:
    bytes_sent: float = 0.0
    bytes_intra: float = 0.0  # the part of bytes_sent on links inside a node
    bytes_inter: float = 0.0  # and between nodes (the ring's node-crossing hops)
    bytes_dense: float = 0.0
    steps: int = 0  # bucket hooks that ran; the launcher counts optimizer steps itself


def nodes_of(world_size: int, ranks_per_node: int | None) -> int:
    """Whole nodes in the job (ranks placed node by node); one when unknown."""
    if ranks_per_node is None:
        ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, world_size // max(1, ranks_per_node))


class CountsBytes:
    """Checkpointing of a hook state whose only state is its ``AllreduceStats``, and the
    counting of a ring allreduce's bytes into it."""
    stats: AllreduceStats
    ranks_per_node: int | None = None

    def count_allreduce(self, nbytes: int, world_size: int) -> None:
        account(self.stats, allreduce_bytes(nbytes, world_size), world_size,
                nodes_of(world_size, self.ranks_per_node))

    def state_dict(self) -> dict:
        return asdict(self.stats)

    def load_state_dict(self, state: dict) -> None:
        self.stats = AllreduceStats(**state)


class CountingAllreduceState(CountsBytes):
    def __init__(self, process_group=None, sparsifier=None, model=None,
                 ranks_per_node: int | None = None):
        """``sparsifier`` (with ``model``, whose parameter names it uses) turns on the
        live-entries-only allreduce under fixed masks. ``ranks_per_node`` splits the bytes
        into intra- and inter-node ones (default: ``LOCAL_WORLD_SIZE``)."""
        self.ranks_per_node = ranks_per_node
        if (sparsifier is None) != (model is None):
            raise TypeError("CountingAllreduceState: pass sparsifier= and model= together")
        self.process_group = process_group
        self.stats = AllreduceStats()
        self.masks = GradientMasks(sparsifier) if sparsifier is not None else None
        self._names = {} if model is None else {
            id(p): n for n, p in getattr(model, "module", model).named_parameters()}

    def live_positions(self, bucket: dist.GradBucket) -> list[torch.Tensor | None] | None:
        """Per tensor of ``bucket``, the flat positions that travel (None: all of it); None
        when the whole bucket travels as it is."""
        if self.masks is None or not self.masks.fixed():
            return None
        positions = [self.masks.live_positions(self._names[id(p)]) for p in bucket.parameters()]
        return None if all(pos is None for pos in positions) else positions


# No ``from __future__ import annotations`` here: DDP inspects the hook's ``bucket``
# annotation at registration and rejects it when it is a string.
def counting_allreduce_hook(state: CountingAllreduceState,
                            bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    group = state.process_group
    world_size = dist.get_world_size(group)
    buffer = bucket.buffer()
    state.stats.bytes_dense += allreduce_bytes(buffer.nbytes, world_size)
    state.stats.steps += 1
    positions = state.live_positions(bucket)
    if positions is None:
        sent = buffer
    else:
        pieces = _split(buffer, bucket)
        sent = torch.cat([gather_live(t, pos) for t, pos in zip(pieces, positions)])
    state.count_allreduce(sent.nbytes, world_size)
    sent.div_(world_size)
    work = dist.all_reduce(sent, group=group, async_op=True)
    if positions is None:
        return work.get_future().then(lambda fut: fut.value()[0])

    def put_back(_) -> torch.Tensor:
        offset = 0
        for t, pos in zip(pieces, positions):
            n = t.numel() if pos is None else pos.numel()
            scatter_live_(t, pos, sent.narrow(0, offset, n))
            offset += n
        return buffer

    return work.get_future().then(put_back)


def _split(buffer: torch.Tensor, bucket: dist.GradBucket) -> list[torch.Tensor]:
    """Flat views of ``buffer``, one per parameter of ``bucket``, in order."""
    return list(buffer.split([p.numel() for p in bucket.parameters()]))


class TorchHookState(CountsBytes):
    """One of torch's compression hooks (``fp16``, ``bf16``, ``powersgd``) with its wire
    bytes counted, so the baselines DGC is compared with report bytes like every run."""

    def __init__(self, kind: str, process_group=None, powersgd_rank: int = 4,
                 powersgd_start_iter: int = 10, ranks_per_node: int | None = None):
        self.kind, self.process_group = kind, process_group
        self.ranks_per_node = ranks_per_node
        self.stats = AllreduceStats()
        if kind == "powersgd":
            self.inner = powerSGD.PowerSGDState(
                process_group, matrix_approximation_rank=powersgd_rank,
                start_powerSGD_iter=powersgd_start_iter)
            self.hook = powerSGD.powerSGD_hook
        elif kind in ("fp16", "bf16"):
            self.inner = process_group
            self.hook = (default_hooks.fp16_compress_hook if kind == "fp16"
                         else default_hooks.bf16_compress_hook)
        else:
            raise ValueError(f"unknown torch hook {kind!r}")

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.kind == "powersgd":  # its error feedback, warm-start Ps and Qs, iteration
            state["powersgd"] = {slot: getattr(self.inner, slot)
                                 for slot in self.inner.__slots__ if slot != "process_group"}
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        inner = state.pop("powersgd", None)
        for slot, value in (inner or {}).items():
            setattr(self.inner, slot, value)
        super().load_state_dict(state)


def counted_torch_hook(state: TorchHookState,
                       bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    world_size = dist.get_world_size(state.process_group)
    buffer = bucket.buffer()
    state.stats.bytes_dense += allreduce_bytes(buffer.nbytes, world_size)
    state.stats.steps += 1
    if state.kind != "powersgd":
        state.count_allreduce(buffer.numel() * 2, world_size)
        return state.hook(state.inner, bucket)
    before = state.inner.total_numel_after_compression
    future = state.hook(state.inner, bucket)
    # The hook sorts tensors and allocates its P and Q buffers before it returns; read
    # the sizes it chose from its own state rather than re-deriving its rules.
    after = state.inner.total_numel_after_compression
    if after == before:  # a plain allreduce, before start_powerSGD_iter
        state.count_allreduce(buffer.nbytes, world_size)
    else:
        p = state.inner.p_memory_dict[bucket.index()].numel()
        q = state.inner.q_memory_dict[bucket.index()].numel()
        for numel in (after - before - p - q, p, q):
            if numel:
                state.count_allreduce(numel * buffer.element_size(), world_size)
    return future


class HierarchicalAllreduceState(CountsBytes):
    """The dense baseline the hierarchical way (as NCCL's and Horovod's hierarchical
    allreduce): inside each node a reduce-scatter, across nodes an allreduce of each shard
    among the ranks holding it, inside the node an allgather; bytes counted by link class.
    Every rank calls the constructor (it creates the node groups)."""

    def __init__(self, ranks_per_node: int):
        from dgc.collectives import node_groups
        world = dist.get_world_size()
        if world % ranks_per_node:
            raise ValueError(f"{ranks_per_node} ranks per node do not divide {world} ranks")
        self.ranks_per_node, self.stats = ranks_per_node, AllreduceStats()
        self.intra, self.inter = node_groups(self, ranks_per_node, world // ranks_per_node)


def hierarchical_allreduce_hook(state: HierarchicalAllreduceState,
                                bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    r, world = state.ranks_per_node, dist.get_world_size()
    state.stats.bytes_dense += allreduce_bytes(buffer.nbytes, world)
    state.stats.steps += 1
    shard = -(-buffer.numel() // r)
    padded = buffer.new_zeros(shard * r)
    padded[:buffer.numel()] = buffer
    mine = buffer.new_empty(shard)
    state.intra.reduce_scatter(mine, padded).wait()
    state.inter.allreduce(mine).wait()
    mine.div_(world)

    def put_back(_) -> torch.Tensor:
        return buffer.copy_(padded[:buffer.numel()])
    return state.intra.allgather(padded, mine).then(put_back)
