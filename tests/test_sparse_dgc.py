"""Weight sparsity and gradient compression together, on 2 real Gloo ranks.

Hard-masked gradients never enter DGC's residuals nor its selection; DNS's are kept (it
splices with them); under fixed masks only live entries travel, so a 2:4 model's dense
exchange moves half the bytes; and none of this changes the arithmetic: with nothing left
out (density 1.0) DGC plus a sparsifier trains exactly like DDP + SGD plus the sparsifier.
"""
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc
import sparse_train
from launch.comm import CountingAllreduceState, counting_allreduce_hook
from tests.distributed import run_ranks
from tests.sparse_helpers import SCHEDULES, batches, mlp, train_step

STEPS = 14
# The test MLP's weights hold 192, 128 and 24 entries; without momentum masking, DGC at
# density 1.0 is SGD with momentum, so runs can be compared with DDP's.
DGC = dict(warmup_epochs=0, min_numel=64, momentum_masking=False)


def _train(rank, method, comm, density=1.0, schedule=None):
    """Train the test MLP; ``comm`` is "ddp" (DDP's own allreduce), "counting" (the
    launcher's hook) or "dgc". Returns the final parameters and what the run observed."""
    model = DDP(mlp(seed=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_train.attach(model, opt, method=method, **(schedule or SCHEDULES[method]))
    state, seen = None, {"picked_masked": 0, "picked": 0, "residual_at_masked": []}
    if comm == "counting":
        state = CountingAllreduceState(sparsifier=sp, model=model)
        model.register_comm_hook(state, counting_allreduce_hook)
    elif comm == "dgc":
        state = dgc.attach(model, opt, sparsifier=sp, density=density, **DGC)
        compress = state.compress

        def spy(name, g, k):  # the real selection, with its picks counted
            indices, values = compress(name, g, k)
            mask = sp.masks[name].reshape(-1)
            seen["picked"] += indices.numel()
            seen["picked_masked"] += int((~mask[indices]).sum())
            return indices, values
        state.compress = spy
    bytes_per_step = []
    for x, y in batches(STEPS, seed=10 + rank):
        before = state.stats.bytes_sent if state is not None else 0.0
        train_step(model, opt, x, y)
        if state is not None:
            bytes_per_step.append(state.stats.bytes_sent - before)
        if comm == "dgc":
            seen["residual_at_masked"].append(max(
                float(buf[name][~sp.masks[name].reshape(-1)].abs().sum())
                for buf in (state._u, state._v) for name in sp.masks if name in buf))
    params = [p.detach().reshape(-1).tolist() for p in model.parameters()]
    return {"params": params, "bytes": bytes_per_step, "seen": seen,
            "fixed": sp.fixed_masks() is not None,
            "live": {n: int(m.sum()) for n, m in sp.masks.items()},
            "density": dict(getattr(state.stats, "density", {})) if state else {}}


def _runs(rank, world_size):
    out = {}
    for method in ("nm", "iht"):
        for comm in ("ddp", "counting", "dgc"):
            out[method, comm] = _train(rank, method, comm)
    out["nm", "dgc-sparse"] = _train(rank, "nm", "dgc", density=0.05,
                                     schedule=dict(nm_start_step=0))
    out["nm0", "counting"] = _train(rank, "nm", "counting", schedule=dict(nm_start_step=0))
    out["dns", "dgc-sparse"] = _train(rank, "dns", "dgc", density=0.05)
    return out


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_runs, 2, timeout=240)


def _max_rel_diff(a, b) -> float:
    a = torch.tensor([v for p in a for v in p])
    b = torch.tensor([v for p in b for v in p])
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("method", ["nm", "iht"])
@pytest.mark.parametrize("comm", ["counting", "dgc"])
def test_masked_exchange_trains_like_ddp_with_the_sparsifier(runs, method, comm):
    for rank in runs:
        assert _max_rel_diff(rank[method, comm]["params"], rank[method, "ddp"]["params"]) < 1e-5


def test_ranks_agree_under_masks(runs):
    for key in runs[0]:
        assert runs[0][key]["params"] == runs[1][key]["params"], key


def test_fixed_2_4_masks_send_half_the_weights_bytes(runs):
    run = runs[0]["nm0", "counting"]
    assert run["fixed"]
    model = mlp(seed=0)
    weights = sum(p.numel() for p in model.parameters() if p.dim() > 1)
    biases = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert sum(run["live"].values()) == weights // 2
    expected = 4 * (weights // 2 + biases)  # p = 2: an allreduce sends its size per rank
    assert run["bytes"] == [pytest.approx(expected)] * STEPS
    assert expected < 0.55 * 4 * (weights + biases)


def test_nm_before_its_start_step_sends_everything(runs):
    run = runs[0]["nm", "counting"]  # nm_start_step=3: dense for the first three steps
    model = mlp(seed=0)
    dense = 4 * sum(p.numel() for p in model.parameters())  # p = 2: size per rank
    assert run["bytes"][:3] == [pytest.approx(dense)] * 3
    assert run["bytes"][-1] < 0.6 * dense


def test_hard_masked_gradients_are_never_selected_nor_accumulated(runs):
    for rank in runs:
        seen = rank["nm", "dgc-sparse"]["seen"]
        assert seen["picked"] > 0
        assert seen["picked_masked"] == 0
        assert max(seen["residual_at_masked"]) == 0.0


def test_top_k_counts_live_entries_only(runs):
    run = runs[0]["nm", "dgc-sparse"]
    for name in ("0.weight", "2.weight"):  # 4.weight is under min_numel: it goes dense
        assert run["density"][name] == pytest.approx(0.05 / 2, abs=0.01), name


def test_dns_keeps_masked_gradients_for_splicing(runs):
    # DNS revises masks until dns_iter_stop (16 > STEPS): its pruned weights keep training,
    # so their gradients do reach the residuals.
    seen = runs[0]["dns", "dgc-sparse"]["seen"]
    assert max(seen["residual_at_masked"]) > 0.0


def test_attach_rejects_a_sparsifier_of_another_model():
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        model, other = DDP(mlp(seed=0)), mlp(seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = sparse_train.attach(other, torch.optim.SGD(other.parameters(), lr=0.1),
                                 method="nm")
        with pytest.raises(ValueError, match="not parameters of this model"):
            dgc.attach(model, opt, sparsifier=sp)
        with pytest.raises(TypeError, match="sparse_train.Sparsifier"):
            dgc.attach(model, opt, sparsifier="nm")
    finally:
        torch.distributed.destroy_process_group()


def test_sparse_exchange_bytes_count_live_entries(runs):
    # 0.weight (96 live) and 2.weight (64 live) send top-k pairs of fp32 value and int32
    # index; 4.weight (12 live of 24) and the biases (27) go dense, live entries only.
    # Counted by hand (at p = 2 a ring allgather and a ring allreduce each send the size
    # of the tensor handed over): k = ceil(0.05 * 96) + ceil(0.05 * 64) = 5 + 4 pairs of 8
    # bytes (72, a multiple of 8: no padding), and 39 dense fp32 entries.
    expected = 8 * 9 + 4 * (12 + 27)
    assert runs[0]["nm", "dgc-sparse"]["bytes"] == [pytest.approx(expected)] * STEPS
