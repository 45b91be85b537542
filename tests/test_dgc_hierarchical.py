"""Hierarchical DGC on 4 real Gloo ranks as 2 nodes x 2: SGD at density 1, nothing lost per
shard, ranks agree, resume, one rank per node is flat DGC, bytes by link class."""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc
from dgc.transport.hierarchical import piece_bounds
from tests.dgc_helpers import nothing_lost, resumed
from tests.distributed import run_ranks
from tests.test_dgc_distributed import MLP, _batch, _flat, _sgd, _train

BUCKET_MB = 0.001  # several buckets, each mixing dense and compressed tensors
HIER = dict(topology="hierarchical", ranks_per_node=2, min_numel=100)


def _run(rank, build, steps=12, start=0):
    model = MLP()
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
    opt, state = build(ddp, model)
    _train(ddp, opt, steps, rank, start=start, state=state)
    return model, ddp, opt, state


def _sgd_at_density_one_and_flat_at_one_rank_per_node(rank, topology: dict) -> dict:
    """Density 1.0 (momentum masking on) against DDP + SGD with momentum and weight decay,
    at 2 ranks per node; and one rank per node against flat DGC, bit for bit."""
    ref, *_ = _run(rank, lambda ddp, m: (_sgd(m, momentum=0.9, weight_decay=1e-2), None))
    got, *_ = _run(rank, lambda ddp, m: (
        opt := _sgd(m, momentum=0.9, weight_decay=1e-2),
        dgc.attach(ddp, opt, density=1.0, **topology))[::1])
    options = dict(density=0.05, warmup_densities=[0.5], value_dtype="fp16", min_numel=100)
    flat, *_ = _run(rank, lambda ddp, m: (opt := _sgd(m, momentum=0.9, nesterov=True),
                                          dgc.attach(ddp, opt, **options))[::1], steps=15)
    one = dict(topology, ranks_per_node=1, **options)
    hier, *_ = _run(rank, lambda ddp, m: (opt := _sgd(m, momentum=0.9, nesterov=True),
                                          dgc.attach(ddp, opt, **one))[::1], steps=15)
    return {"density1": max(((a - b).norm() / b.norm()).item()
                            for a, b in zip(got.parameters(), ref.parameters())),
            "one_per_node_equal": torch.equal(_flat(flat), _flat(hier))}


def _equivalence_and_flat_rank(rank, world_size):
    out = _sgd_at_density_one_and_flat_at_one_rank_per_node(rank, HIER)
    # every rank holds the same parameters
    model, _, _, state = _run(rank, lambda ddp, m: (
        opt := _sgd(m, momentum=0.9), dgc.attach(ddp, opt, density=0.05, **HIER))[::1])
    everyone = [torch.empty_like(_flat(model)) for _ in range(world_size)]
    dist.all_gather(everyone, _flat(model))
    out["agree"] = all(torch.equal(everyone[0], e) for e in everyone)
    out["memory"] = sum(t.numel() for t in state.state_dict()["accumulation"].values())
    out["stats"] = state.compression_stats()
    # inter-node bytes: flat DGC's ring crosses nodes on 2 of its 4 hops; hierarchical
    # sends each shard's pairs to the one peer holding it on the other node
    for topology in ("flat", "hierarchical"):
        _, _, _, state = _run(rank, lambda ddp, m: (
            opt := _sgd(m, momentum=0.9), dgc.attach(ddp, opt, density=0.01, warmup_epochs=0,
                                                     min_numel=100, ranks_per_node=2,
                                                     topology=topology,
                                                     exchange="allgather"))[::1])
        out[topology] = state.compression_stats()
    return out


def test_density_one_agreement_and_one_rank_per_node_is_flat():
    results = run_ranks(_equivalence_and_flat_rank, 4, timeout=300)
    compressed = 16 * 64 + 64 * 48 + 48 * 8  # MLP's weights of >= 100 entries
    for r in results:
        assert r["density1"] < 1e-6
        assert r["one_per_node_equal"]
        assert r["agree"]
        # each rank keeps the residual of half of each compressed tensor (its pieces)
        assert r["memory"] == compressed // 2
        assert r["stats"]["bytes_inter_node"] > 0 and r["stats"]["bytes_intra_node"] > 0
        flat, hier = r["flat"], r["hierarchical"]
        assert flat["bytes_intra_node"] == flat["bytes_inter_node"]  # half the hops cross
        assert hier["bytes_inter_node"] < flat["bytes_inter_node"] / 2


def _conserving(topology: dict):
    """The conservation tests' model, DDP, shapes, compressed names (sorted: a set's order
    differs between processes, and the all_reduces must not) and DGC state."""
    torch.manual_seed(0)
    model = MLP(wide=True)
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    compressed = sorted(n for n, s in shapes.items() if len(s) > 1 and s.numel() >= 100)
    state = dgc.DGCState(model=ddp, momentum=0.9, density=0.02, warmup_epochs=0,
                         momentum_masking=False, value_dtype="fp16", **topology)
    return model, ddp, shapes, compressed, state


def _conservation_rank(rank, world_size):
    """Over all ranks: what was applied, times p, plus every owner's residual equals the
    sum over steps of the momentum-corrected gradient sum U(t) = m U(t-1) + G(t), G(t) the
    sum of all ranks' gradients (per piece, the node sums' momenta add up to it)."""
    model, ddp, shapes, compressed, state = _conserving(HIER)

    def placed(state):  # every owner's residual, put back at its piece of the tensor
        residual = {n: torch.zeros(shapes[n].numel()) for n in compressed}
        local = rank % 2
        for n, v in state.state_dict()["accumulation"].items():
            if n in compressed:
                b = piece_bounds(shapes[n].numel(), 2)
                residual[n][b[local]:b[local + 1]] += v
        return residual
    errors, _, _ = nothing_lost(model, ddp, state, rank, 20, compressed, placed)
    return errors


def test_nothing_is_lost_per_shard():
    for errors in run_ranks(_conservation_rank, 4, timeout=300):
        assert errors and max(errors.values()) < 1e-5, errors


def _resume_rank(rank, world_size):
    def fresh(seed):
        model = MLP(seed, wide=True)
        ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
        opt = _sgd(model, momentum=0.9, weight_decay=1e-3)
        return model, ddp, opt, dgc.attach(ddp, opt, density=0.02, warmup_densities=[0.3],
                                           **HIER)
    uninterrupted, model, _ = resumed(fresh, rank, steps=14, at=7, epochs=True)
    return torch.equal(_flat(model), uninterrupted)


def test_resume_into_a_new_ddp_model_is_bitwise():
    assert all(run_ranks(_resume_rank, 4, timeout=300))


def _hier_dense_rank(rank, world_size):
    from launch.comm import HierarchicalAllreduceState, hierarchical_allreduce_hook
    ref = MLP()
    ref_ddp = DDP(ref, bucket_cap_mb=BUCKET_MB)
    _train(ref_ddp, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), 6, rank)
    got = MLP()
    ddp = DDP(got, bucket_cap_mb=BUCKET_MB)
    state = HierarchicalAllreduceState(2)
    ddp.register_comm_hook(state, hierarchical_allreduce_hook)
    _train(ddp, torch.optim.SGD(got.parameters(), lr=0.05, momentum=0.9), 6, rank)
    worst = max(((a - b).norm() / b.norm()).item()
                for a, b in zip(got.parameters(), ref.parameters()))
    return worst, state.stats.bytes_intra, state.stats.bytes_inter


def test_the_hierarchical_dense_baseline_is_ddp_and_sends_a_shard_across_nodes():
    for worst, intra, inter in run_ranks(_hier_dense_rank, 4, timeout=240):
        assert worst < 1e-6
        assert 0 < inter < intra  # each rank carries half the bucket across, once each way


# -- intra_node: sparse (dgc.transport.hierarchical_sparse) ----------------------------------
SPARSE_INTRA = dict(HIER, intra_node="sparse")


def _sparse_intra_rank(rank, world_size):
    """Over all ranks: applied updates (times p) plus every rank's residual (each holds its
    whole tensors) equal the sum of the momentum-corrected gradient sums; ranks agree."""
    model, ddp, _, compressed, state = _conserving(SPARSE_INTRA)
    errors, agree, applied = nothing_lost(model, ddp, state, rank, 20, compressed)
    kept = sum(int((applied[n] != 0).sum()) for n in compressed)
    return errors, agree, state.stats.sparse_buckets, kept


def _sparse_intra_equivalence_rank(rank, world_size):
    out = _sgd_at_density_one_and_flat_at_one_rank_per_node(rank, SPARSE_INTRA)

    def fresh(seed):
        # one bucket: a restored DDP model's first iteration has the same composition (a
        # bucket's route, pairs or the dense fallback, is chosen for its tensors together)
        model = MLP(seed, wide=True)
        ddp = DDP(model, bucket_cap_mb=100)
        opt = _sgd(model, momentum=0.9, weight_decay=1e-3)
        return model, ddp, opt, dgc.attach(ddp, opt, density=0.02, warmup_densities=[0.3],
                                           **SPARSE_INTRA)
    uninterrupted, model, _ = resumed(fresh, rank, steps=14, at=7, epochs=True)
    out["resume"] = torch.equal(_flat(model), uninterrupted)
    for topology, extra in (("flat", {}), ("hierarchical", {"intra_node": "sparse"})):
        _, _, _, state = _run(rank, lambda ddp, m: (
            opt := _sgd(m, momentum=0.9), dgc.attach(ddp, opt, density=0.01, warmup_epochs=0,
                                                     min_numel=100, ranks_per_node=2,
                                                     topology=topology, exchange="allgather",
                                                     **extra))[::1])
        out[topology] = state.compression_stats()
    return out


def test_sparse_intra_node_stage_loses_nothing_and_ranks_agree():
    for errors, agree, sparse, kept in run_ranks(_sparse_intra_rank, 4, timeout=300):
        assert agree and sparse > 0 and kept > 0
        assert errors and max(errors.values()) < 1e-5, errors


def test_sparse_intra_node_stage_is_sgd_at_density_one_flat_at_one_rank_per_node_and_resumes():
    for r in run_ranks(_sparse_intra_equivalence_rank, 4, timeout=400):
        assert r["density1"] < 1e-6
        assert r["one_per_node_equal"]
        assert r["resume"]
        flat, hier = r["flat"], r["hierarchical"]
        # pairs between nodes: (N - 1) k / r per rank against the flat ring's 1.5 k here;
        # the small tensors' allreduce crosses alike in both
        assert 0 < hier["bytes_inter_node"] < flat["bytes_inter_node"]
        assert hier["bytes_intra_node"] < flat["bytes_intra_node"] * 3


def test_sparse_intra_node_stage_refuses_a_non_allgather_exchange_in_one_line():
    import pytest
    from sparse_comm.schema import ConfigError, build
    with pytest.raises(ConfigError, match="intra_node 'sparse'"):
        build(dgc.DGCOptions, dict(topology="hierarchical", intra_node="sparse",
                                   exchange="gtopk"))


def _sparse_intra_nonfinite_rank(rank, world_size):
    """check_finite beside the node's merge: a step whose last bucket is not finite goes
    dense for that bucket and the others still merge; ranks agree."""
    model = MLP(wide=True)
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
    opt = _sgd(model, momentum=0.9)
    state = dgc.attach(ddp, opt, density=0.02, warmup_epochs=0, check_finite=True,
                       **SPARSE_INTRA)
    first = next(model.parameters())  # in DDP's last bucket (buckets run in reverse)
    poison = {"on": False}
    first.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    _train(ddp, opt, 3, rank)
    poison["on"] = True
    opt.zero_grad()
    x, y = _batch(rank, 3)
    torch.nn.functional.mse_loss(ddp(x), y).backward()  # a scaler would skip this step
    flat = _flat(model)
    everyone = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(everyone, flat)
    return (state.stats.nonfinite_buckets, state.stats.sparse_buckets,
            all(torch.equal(everyone[0], e) for e in everyone))


def test_sparse_intra_node_stage_finishes_a_step_whose_last_bucket_is_not_finite():
    for nonfinite, sparse, agree in run_ranks(_sparse_intra_nonfinite_rank, 4, timeout=240):
        assert nonfinite == 1 and sparse > 0 and agree


def _masked_rank(rank, world_size):
    """Both intra-node stages under a fixed 2:4 sparsifier: pruned weights stay zero and
    their gradients never reach DGC's memory; ranks agree."""
    import sparse_train
    out = {}
    for name, topology in (("dense", HIER), ("sparse", SPARSE_INTRA)):
        model = MLP(wide=True)
        ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
        opt = _sgd(model, momentum=0.9)
        sp = sparse_train.attach(ddp, opt, method="nm", nm_start_step=0)
        state = dgc.attach(ddp, opt, sparsifier=sp, density=0.05, warmup_epochs=0,
                           **topology)
        _train(ddp, opt, 8, rank)
        flat = _flat(model)
        everyone = [torch.empty_like(flat) for _ in range(world_size)]
        dist.all_gather(everyone, flat)
        params = dict(model.named_parameters())
        pruned = {n: ~m.bool() for n, m in sp.masks.items()}
        out[name] = {
            "agree": all(torch.equal(everyone[0], e) for e in everyone),
            "pruned_zero": all(float(params[n].detach()[p].abs().max()) == 0.0
                               for n, p in pruned.items()),
            "sparse": state.stats.sparse_buckets,
            # whole tensors (sparse stage) are checked where the mask prunes; a dense stage
            # keeps pieces, whose sum of |u| + |v| can only be read whole
            "memory_at_pruned": sum(float(buf[n][pruned[n].reshape(-1)].abs().sum())
                                    for buf in (state._u, state._v) for n in pruned
                                    if n in buf and buf[n].numel() == pruned[n].numel()),
        }
    return out


def test_both_intra_node_stages_respect_a_fixed_2_4_mask():
    for r in run_ranks(_masked_rank, 4, timeout=300):
        for name in ("dense", "sparse"):
            assert r[name]["agree"] and r[name]["pruned_zero"] and r[name]["sparse"] > 0, r
        assert r["sparse"]["memory_at_pruned"] == 0.0
