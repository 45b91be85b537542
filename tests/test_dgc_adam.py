"""DGC with Adam and AdamW on 2 real Gloo ranks: the dense warm-up is DDP + AdamW, the frozen
phase is Adam with a frozen variance, ranks agree, resume is bitwise; the launcher runs
AdamW + DGC with bf16 autocast and gradient accumulation."""
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc
from tests.dgc_helpers import resumed
from tests.distributed import run_ranks
from tests.launch_helpers import REPO, read_run, train
from tests.test_dgc_distributed import MLP, _flat, _train

WARMUP = 6


def _adamw(model, cls=torch.optim.AdamW, wd=1e-2):
    return cls(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)


def _frozen_reference(model, ddp, opt, rank, steps, start, beta1=0.9, refresh=0):
    """DDP + Adam whose second moment is frozen after the warm-up (and, every ``refresh``
    steps, takes the gradient in with weight 1 - b2^refresh): the update the
    frozen-variance mode must give at density 1.0."""
    from dgc.adam import VARIANCE_FLOOR
    bias2 = {p: 1 - 0.99 ** float(opt.state[p]["step"]) for p in model.parameters()}
    floor = {p: VARIANCE_FLOOR * float(opt.state[p]["exp_avg_sq"].mean())
             for p in model.parameters()}
    t = int(opt.state[next(iter(model.parameters()))]["step"])
    for step in range(start, start + steps):
        _train(ddp, torch.optim.SGD(model.parameters(), lr=0.0), 1, rank, start=step)
        t += 1
        with torch.no_grad():
            for p in model.parameters():
                st = opt.state[p]
                st["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                if refresh and (step - start + 1) % refresh == 0:
                    c = 0.99 ** refresh
                    st["exp_avg_sq"].mul_(c).addcmul_(p.grad, p.grad, value=1 - c)
                    bias2[p] = 1 - c * (1 - bias2[p])
                    floor[p] = VARIANCE_FLOOR * float(st["exp_avg_sq"].mean())
                denom = st["exp_avg_sq"].clamp(min=floor[p]).sqrt() / math.sqrt(bias2[p]) + 1e-8
                p.mul_(1 - 1e-2 * 1e-2)
                p.addcdiv_(st["exp_avg"], denom, value=-1e-2 / (1 - beta1 ** t))


def _equivalence_rank(rank, world_size):
    out = {}
    for mode, refresh, selection in (("frozen_variance", 0, "momentum"),
                                     ("error_feedback", 0, "momentum"),
                                     ("frozen_variance", 3, "momentum"),
                                     ("frozen_variance", 0, "update")):
        ref = MLP()
        ref_ddp = DDP(ref, bucket_cap_mb=0.001)
        ref_opt = _adamw(ref)
        _train(ref_ddp, ref_opt, WARMUP, rank)
        got = MLP()
        ddp = DDP(got, bucket_cap_mb=0.001)
        opt = _adamw(got)
        state = dgc.attach(ddp, opt, density=1.0, adam_mode=mode, adam_warmup_steps=WARMUP,
                           adam_variance_refresh=refresh, adam_selection=selection,
                           min_numel=100)
        _train(ddp, opt, WARMUP, rank)
        key = f"{mode}/refresh {refresh}/{selection}"
        out[f"{key}/warmup"] = max(((a - b).norm() / b.norm()).item()
                                   for a, b in zip(got.parameters(), ref.parameters()))
        if mode == "frozen_variance":
            sent = state.stats.bytes_sent
            _frozen_reference(ref, ref_ddp, ref_opt, rank, 8, WARMUP, refresh=refresh)
            _train(ddp, opt, 8, rank, start=WARMUP)
            out[f"{key}/frozen"] = max(((a - b).norm() / b.norm()).item()
                                       for a, b in zip(got.parameters(), ref.parameters()))
            out[f"frozen {refresh} {selection}"] = state.adam.frozen and not state.passthrough
            out[f"sent {refresh} {selection}"] = state.stats.bytes_sent - sent
    return out


def test_density_one_is_ddp_adamw_in_the_warmup_and_frozen_variance_adam_after():
    """Also with the variance refreshed every 3 steps, which costs two dense averages more
    in 8 steps, and with entries ranked by Adam's step (gradients divided by the frozen
    denominators before DGC)."""
    for r in run_ranks(_equivalence_rank, 2, timeout=240):
        assert r["frozen 0 momentum"] and r["frozen 3 momentum"] and r["frozen 0 update"]
        per_step = r["sent 0 momentum"] / 8
        assert r["sent 3 momentum"] == pytest.approx(r["sent 0 momentum"] + 2 * per_step,
                                                     rel=0.05)
        for key, worst in r.items():
            if "/" in key:
                assert worst < 1e-6, (key, worst)


def _agree_and_resume_rank(rank, world_size, mode, cls, refresh=0, selection="momentum"):
    def fresh(seed):
        model = MLP(seed, wide=True)
        ddp = DDP(model, bucket_cap_mb=0.001)
        opt = _adamw(model, cls)
        state = dgc.attach(ddp, opt, density=0.02, adam_mode=mode, adam_warmup_steps=4,
                           adam_variance_refresh=refresh, adam_selection=selection,
                           warmup_epochs=0, min_numel=100)
        return model, ddp, opt, state

    uninterrupted, model, state = resumed(fresh, rank, steps=12, at=7)
    everyone = [torch.empty_like(uninterrupted) for _ in range(world_size)]
    torch.distributed.all_gather(everyone, uninterrupted)
    return (all(torch.equal(everyone[0], e) for e in everyone),
            torch.equal(_flat(model), uninterrupted), state.stats.sparse_buckets > 0,
            torch.isfinite(uninterrupted).all().item())


@pytest.mark.parametrize("mode,cls,refresh,selection", [
    ("frozen_variance", torch.optim.AdamW, 0, "momentum"),
    ("frozen_variance", torch.optim.Adam, 0, "momentum"),
    ("frozen_variance", torch.optim.AdamW, 2, "momentum"),
    ("frozen_variance", torch.optim.Adam, 0, "update"),
    ("error_feedback", torch.optim.AdamW, 0, "momentum")])
def test_ranks_agree_and_resume_is_bitwise(mode, cls, refresh, selection):
    for agree, same, compressed, finite in run_ranks(_agree_and_resume_rank, 2, mode, cls,
                                                     refresh, selection):
        assert agree and same and compressed and finite


def test_other_optimizers_get_one_line():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="SGD, Adam and AdamW .* got Adagrad"):
        dgc.attach(model, torch.optim.Adagrad(model.parameters()))


def test_the_launcher_runs_adamw_with_dgc_bf16_autocast_and_gradient_accumulation(tmp_path):
    out = tmp_path / "run"
    train(REPO / "configs/mnist_lenet300_dgc.yaml", "data.name=synthetic",
          "data.synthetic_train_size=512", "data.synthetic_test_size=128",
          "train.batch_size=16", "train.epochs=2", "wandb.mode=disabled",
          "train.optimizer=adamw", "train.lr=0.001", "train.weight_decay=0.01",
          "train.amp=bf16", "train.grad_accum_steps=2", "dgc.adam_warmup_steps=4",
          "dgc.warmup_epochs=0", "train.clip_grad_norm=1.0", f"out_dir={out}", nproc=2)
    summary, metrics = read_run(out)
    assert summary["steps"] == 16  # 512 / (16 x 2 ranks x 2 micro-steps) x 2 epochs
    assert math.isfinite(summary["test_accuracy"]) and summary["comm_bytes_sent"] > 0
    # after the 4 dense steps the first moment is compressed
    assert summary["comm_bytes_sent"] < 0.5 * summary["comm_bytes_dense"]


def _selection_rank(rank, world_size, selection):
    """A 1x8 weight whose gradient is 1 on entries 0-3 and 0.5 on 4-7, Adam's frozen
    denominator 1 everywhere but 1e-3 on entries 4 and 5; DGC sends 2 entries. Returns
    which entries the first frozen step moved."""
    model = nn.Linear(8, 1, bias=False)
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    state = dgc.attach(ddp, opt, density=0.25, adam_mode="frozen_variance",
                       adam_warmup_steps=1, adam_selection=selection, warmup_epochs=0,
                       dense_fallback=False, min_numel=1)
    x = torch.tensor([[1.0] * 4 + [0.5] * 4])

    def step():
        opt.zero_grad()
        ddp(x).sum().backward()
        opt.step()

    step()  # the dense Adam step; the variance freezes after it
    denominator = torch.ones(1, 8)
    denominator[0, 4:6] = 1e-3
    state.adam._denoms["weight"] = denominator  # in place of the one the warm-up gave
    before = model.weight.detach().clone()
    step()
    return (model.weight.detach() != before).reshape(-1).nonzero().reshape(-1).tolist()


@pytest.mark.parametrize("selection,moved", [("update", [4, 5]), ("momentum", None)])
def test_update_selection_sends_the_entries_adam_would_move_most(selection, moved):
    """By momentum the larger gradients (entries 0-3) go first; by Adam's step, the entries
    whose frozen denominator is 1000x smaller (4 and 5), though their gradient is half."""
    for got in run_ranks(_selection_rank, 2, selection):
        if moved is not None:
            assert got == moved
        else:
            assert len(got) == 2 and set(got) <= {0, 1, 2, 3}
