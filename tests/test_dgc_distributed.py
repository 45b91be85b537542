"""DGC on real Gloo ranks: SGD equivalence at density 1, nothing lost, ranks agree, bytes, resume.

Each test starts one group of processes and runs several configurations inside it, since
starting processes costs more than the tiny models train.
"""
import copy
import math
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc
from dgc import codec, wire
from dgc.schedule import topk_count
from tests.distributed import run_ranks

# 0.001 MB buckets split the MLP into three buckets, each mixing dense (biases, 8x4) and
# compressed (2-D, >= MIN_NUMEL elements) tensors. The wide MLP's 512x256 weight is large
# enough for select_topk's sampled-threshold path (smaller ones take its exact top-k path).
BUCKET_MB = 0.001
MIN_NUMEL = 100
LR = 0.05
# the allgather the hook calls (torch 2.13 renamed all_gather_into_tensor)
GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


class MLP(nn.Module):
    def __init__(self, seed: int = 0, unused: bool = False, wide: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        a, b = (512, 256) if wide else (64, 48)
        self.body = nn.Sequential(nn.Linear(16, a), nn.ReLU(), nn.Linear(a, b), nn.ReLU(),
                                  nn.Linear(b, 8), nn.ReLU(), nn.Linear(8, 4))
        self.unused = nn.Linear(16, 16) if unused else None

    def forward(self, x):
        return self.body(x)


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def _train(ddp, opt, steps, rank, *, start=0, micro=1, state=None, steps_per_epoch=5):
    for step in range(start, start + steps):
        if state is not None:
            state.set_epoch(step // steps_per_epoch)
        opt.zero_grad()
        for j in range(micro):
            x, y = _batch(rank, step * micro + j)
            with ddp.no_sync() if j < micro - 1 else nullcontext():
                nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()


def _sgd(model, momentum=0.0, nesterov=False, weight_decay=0.0, bias_decay=True):
    if bias_decay:
        groups = [{"params": list(model.parameters())}]
    else:
        groups = [{"params": [p for p in model.parameters() if p.dim() > 1]},
                  {"params": [p for p in model.parameters() if p.dim() == 1],
                   "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=LR, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# -- density 1.0 equals DDP + SGD -------------------------------------------------------------

EQUIVALENCE_CASES = [
    dict(sgd=dict(momentum=0.9, weight_decay=1e-2)),
    dict(sgd=dict(momentum=0.9, weight_decay=1e-2), dgc=dict(momentum_masking=False)),
    # a 1.0 in warmup_densities (epoch 0 throughout: _train is given no state to step)
    dict(sgd=dict(momentum=0.9), dgc=dict(warmup_densities=[1.0], density=0.01)),
    dict(sgd=dict(momentum=0.9, nesterov=True), micro=2),  # no_sync accumulation
    dict(sgd=dict(momentum=0.9, nesterov=True, weight_decay=5e-3), dgc=dict(dense_fallback=False),
         ddp=dict(static_graph=True)),
    dict(sgd=dict(momentum=0.9, weight_decay=1e-2, bias_decay=False),
         dgc=dict(dense_fallback=False)),
    dict(sgd=dict(weight_decay=1e-2), dgc=dict(dense_fallback=False)),
    dict(sgd=dict(momentum=0.9, weight_decay=1e-2), ddp=dict(find_unused_parameters=True),
         unused=True, dgc=dict(dense_fallback=False)),
]


def _equivalence_rank(rank, world_size, cases):
    results = []
    for case in cases:
        runs = []
        for use_dgc in (False, True):
            model = MLP(unused=case.get("unused", False))
            ddp = DDP(model, bucket_cap_mb=BUCKET_MB, **case.get("ddp", {}))
            opt = _sgd(model, **case["sgd"])
            state = None
            if use_dgc:
                state = dgc.attach(ddp, opt, min_numel=MIN_NUMEL, **{
                    "density": 1.0, "momentum_masking": True, **case.get("dgc", {})})
            _train(ddp, opt, 50, rank, micro=case.get("micro", 1))
            runs.append((model, state))
        (ref, _), (got, state) = runs
        worst = max(((a - b).norm() / b.norm()).item()
                    for a, b in zip(got.parameters(), ref.parameters()))
        results.append((worst, state.stats.sparse_buckets, state.stats.dense_buckets))
    return results


def _bucket_view_rank(rank, world_size):
    same = []
    for micro in (1, 2):
        params = []
        for view in (False, True):
            model = MLP(wide=True)
            ddp = DDP(model, bucket_cap_mb=BUCKET_MB, gradient_as_bucket_view=view)
            opt = _sgd(model, momentum=0.9, weight_decay=1e-2)
            dgc.attach(ddp, opt, min_numel=MIN_NUMEL, density=0.01, dense_fallback=False)
            _train(ddp, opt, 12, rank, micro=micro)
            params.append(_flat(model))
        same.append(torch.equal(*params))
    return same


def test_gradients_as_ddp_bucket_views_change_no_bit():
    """launch.train builds DDP with gradient_as_bucket_view=True: the hook's update then is
    the gradient itself, not a copy of it, and every parameter keeps the same bits."""
    for rank, same in enumerate(run_ranks(_bucket_view_rank, 2)):
        assert same == [True, True], (rank, same)


def test_density_one_equals_ddp_sgd_with_momentum_masking_on_or_off():
    """At density 1.0 every tensor goes the dense way (momentum after averaging), so DGC is
    DDP + SGD with momentum, momentum masking or not (it used to zero the momentum of
    every 'sent' entry: plain SGD)."""
    results = run_ranks(_equivalence_rank, 2, EQUIVALENCE_CASES, timeout=240)
    for case, (worst, sparse, dense) in zip(EQUIVALENCE_CASES, results[0]):
        assert worst < 1e-6, (case, worst)
        assert sparse == 0 and dense > 0, case  # no (index, value) pairs at density 1


# -- nothing is lost ------------------------------------------------------------------------

DENSITY = 0.02


def _conservation_rank(rank, world_size, nesterov, value_dtype):
    """Per rank and compressed tensor: sum of sent values + final residual == sum of the
    momentum-corrected gradients; and each step's update == mean of what all ranks sent.
    With fp16/bf16 values the rounding error must stay in the residual."""
    model = MLP(wide=True)
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
    names = {id(p): n for n, p in model.named_parameters()}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    compressed = {n for n, s in shapes.items() if len(s) > 1 and s.numel() >= MIN_NUMEL}
    state = dgc.DGCState(model=ddp, momentum=0.9, nesterov=nesterov, density=DENSITY,
                         warmup_epochs=0, momentum_masking=False, min_numel=MIN_NUMEL,
                         value_dtype=value_dtype)
    step_log = {"raw": {}, "out": {}, "gathers": []}

    def recording_hook(state, bucket):
        bucket_names = [names[id(p)] for p in bucket.parameters()]
        step_log["bucket"] = bucket_names
        step_log["raw"].update((n, g.detach().clone().reshape(-1))
                               for n, g in zip(bucket_names, bucket.gradients()))

        def record_output(fut):
            out = fut.value()
            offset = 0
            for n in bucket_names:
                step_log["out"][n] = out[offset:offset + shapes[n].numel()].clone()
                offset += shapes[n].numel()
            return out
        return dgc.dgc_hook(state, bucket).then(record_output)

    ddp.register_comm_hook(state, recording_hook)
    real_gather = getattr(dist, GATHER)

    def recording_gather(out, inp, *args, **kwargs):
        step_log["gathers"].append((step_log["bucket"], out))
        return real_gather(out, inp, *args, **kwargs)

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    u = {n: torch.zeros(shapes[n].numel()) for n in compressed}
    corrected = {n: torch.zeros(shapes[n].numel()) for n in compressed}
    sent = {n: torch.zeros(shapes[n].numel()) for n in compressed}
    update_errors = []
    for step in range(30):
        step_log.update(raw={}, out={}, gathers=[])
        setattr(dist, GATHER, recording_gather)
        try:
            _train(ddp, opt, 1, rank, start=step)
        finally:
            setattr(dist, GATHER, real_gather)
        mean_sent = {n: torch.zeros(shapes[n].numel()) for n in compressed}
        for bucket_names, out in step_log["gathers"]:
            ks = [topk_count(shapes[n].numel(), DENSITY) for n in bucket_names if n in compressed]
            layout = codec.Layout(sum(ks), codec.VALUE_DTYPES[value_dtype], torch.int32)
            indices, values = codec.unpack(out, layout, world_size)
            for r in range(world_size):
                flat = torch.zeros(sum(shapes[n].numel() for n in bucket_names))
                flat[indices[r].long()] = values[r].float()
                for n, part in zip(bucket_names, flat.split([shapes[n].numel()
                                                             for n in bucket_names])):
                    if n in compressed:
                        mean_sent[n] += part / world_size
                        if r == rank:
                            sent[n] += part
        assert sorted(b for bucket_names, _ in step_log["gathers"] for b in bucket_names
                      if b in compressed) == sorted(compressed)
        for n in compressed:
            g = step_log["raw"][n]
            u[n].mul_(0.9).add_(g)
            corrected[n] += g + 0.9 * u[n] if nesterov else u[n]
            update_errors.append(((step_log["out"][n] - mean_sent[n]).norm()
                                  / mean_sent[n].norm()).item())
    residual = state.state_dict()["accumulation"]
    conservation_errors = {n: ((sent[n] + residual[n] - corrected[n]).norm()
                               / corrected[n].norm()).item() for n in compressed}
    return conservation_errors, max(update_errors)


CONSERVATION_CASES = [(False, "fp32"), (True, "fp32"), (False, "fp16"), (True, "bf16")]


def _conservation_ranks(rank, world_size):
    return [_conservation_rank(rank, world_size, nesterov, dtype)
            for nesterov, dtype in CONSERVATION_CASES]


def test_nothing_is_lost_in_any_value_dtype():
    for rank_results in run_ranks(_conservation_ranks, 2, timeout=240):
        for case, (conservation, update_error) in zip(CONSERVATION_CASES, rank_results):
            assert update_error < 1e-6, case
            assert conservation and max(conservation.values()) < 1e-5, (case, conservation)


# -- ranks agree; bytes are what went to the collectives -------------------------------------


class _CollectiveCounter:
    """While ``active``, counts calls of the collectives the hook uses and adds up their
    per-rank ring wire bytes, computed here from the tensors handed over (not by dgc.wire)."""

    def __init__(self, world_size):
        self.p, self.bytes, self.calls, self.active = world_size, 0.0, 0, False
        self.real = {name: getattr(dist, name) for name in ("all_reduce", GATHER)}

    def __enter__(self):
        dist.all_reduce = self._wrap("all_reduce",
                                     lambda t, *_: 2 * (self.p - 1) / self.p * t.nbytes)
        setattr(dist, GATHER, self._wrap(GATHER, lambda out, t, *_: (self.p - 1) * t.nbytes))
        return self

    def __exit__(self, *exc):
        for name, real in self.real.items():
            setattr(dist, name, real)

    def _wrap(self, name, wire_bytes):
        def counted(*args, **kwargs):
            if self.active:
                self.calls += 1
                self.bytes += wire_bytes(*args)
            return self.real[name](*args, **kwargs)
        return counted


AGREEMENT_CASES = [
    dict(dgc=dict(density=0.02, warmup_densities=[0.6, 0.2]), ddp={}),
    dict(dgc=dict(density=0.02, warmup_epochs=2, value_dtype="bf16", index_dtype="int64",
                  clip_norm=1.0, check_finite=True),
         ddp=dict(find_unused_parameters=True), unused=True),
    dict(dgc=dict(density=0.05, value_dtype="fp16", warmup_epochs=1), ddp=dict(static_graph=True)),
    # a warm-up counted in the hook's own steps, moving mid-epoch
    dict(dgc=dict(density=0.02, warmup_steps=6, warmup_densities=[0.6, 0.2]), ddp={}),
]


def _agreement_rank(rank, world_size, cases):
    results = []
    for case in cases:
        model = MLP(unused=case.get("unused", False))
        ddp = DDP(model, bucket_cap_mb=BUCKET_MB, **case["ddp"])
        opt = _sgd(model, momentum=0.9, nesterov=True, weight_decay=1e-3)
        # the allgather exchange (the sparse allreduce is tests/test_sparse_allreduce.py)
        state = dgc.attach(ddp, opt, min_numel=MIN_NUMEL, exchange="allgather", **case["dgc"])
        agree = True
        with _CollectiveCounter(world_size) as counter:
            for step in range(15):
                counter.active = True
                _train(ddp, opt, 1, rank, start=step, state=state)
                counter.active = False
                flat = _flat(model)
                everyone = [torch.empty_like(flat) for _ in range(world_size)]
                dist.all_gather(everyone, flat)
                agree &= all(torch.equal(flat, other) for other in everyone)
        buckets = state.stats.sparse_buckets + state.stats.dense_buckets
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        results.append(dict(
            agree=agree, counted=counter.bytes, sent=state.stats.bytes_sent,
            calls=counter.calls, buckets=buckets, sparse=state.stats.sparse_buckets,
            dense=state.stats.dense_buckets, steps=state.stats.steps,
            bytes_dense=state.stats.bytes_dense, density=dict(state.stats.density),
            expected_dense=15 * 2 * (world_size - 1) / world_size * model_bytes,
            finite=torch.isfinite(_flat(model)).all().item()))
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_agree_and_bytes_match_collectives(world_size):
    results = run_ranks(_agreement_rank, world_size, AGREEMENT_CASES, timeout=240)
    for rank_results in results:
        for case, r in zip(AGREEMENT_CASES, rank_results):
            assert r["agree"] and r["finite"], case
            assert r["steps"] == 15
            assert r["sent"] == pytest.approx(r["counted"], rel=1e-12), case
            assert r["bytes_dense"] == pytest.approx(r["expected_dense"], rel=1e-12), case
            extra = r["buckets"] if case["dgc"].get("check_finite") else 0  # finite flags
            assert r["calls"] <= 2 * r["buckets"] + extra, case
            assert r["sparse"] > 0 and r["sent"] < r["bytes_dense"], case
            # warm-up is over by the last step: per-layer densities are the target's
            assert r["density"]["body.2.weight"] == pytest.approx(case["dgc"]["density"],
                                                                  rel=0.01)
            assert r["density"]["body.0.bias"] == r["density"]["body.6.weight"] == 1.0
    # the 0.6 warm-up epoch is above break-even on 2 and 3 ranks: those buckets go dense
    assert results[0][0]["dense"] > 0


def _dense_tensor_bytes_rank(rank, world_size):
    model = MLP()
    ddp = DDP(model, bucket_cap_mb=100)  # one bucket: its pairs and its whole tensors
    opt = _sgd(model, momentum=0.9)
    state = dgc.attach(ddp, opt, density=0.02, warmup_epochs=0, value_dtype="fp16",
                       min_numel=MIN_NUMEL, dense_fallback=False, exchange="allgather")
    _train(ddp, opt, 3, rank, state=state)
    whole = sum(p.numel() for n, p in model.named_parameters() if state.stats.density[n] == 1.0)
    return (state.stats.bytes_dense_tensors, state.stats.bytes_sent, whole,
            state.compression_stats()["bytes_dense_tensors"])


def test_the_tensors_sent_whole_are_counted_apart_from_the_pairs():
    """The 1-D and small tensors of a compressed bucket go in one fp16 allreduce beside the
    pairs; their wire bytes are ``bytes_dense_tensors``, a part of ``bytes_sent``."""
    for counted, sent, whole, logged in run_ranks(_dense_tensor_bytes_rank, 2, timeout=120):
        assert whole > 0
        assert counted == logged == 3 * wire.allreduce_bytes(2 * whole, 2)
        assert 0 < counted < sent


# -- resume ---------------------------------------------------------------------------------


def _resume_rank(rank, world_size):
    def fresh(seed):
        model = MLP(seed, wide=True)
        ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
        opt = _sgd(model, momentum=0.9, weight_decay=1e-3)
        state = dgc.attach(ddp, opt, density=0.02, warmup_densities=[0.6, 0.2],
                           min_numel=MIN_NUMEL, momentum_masking=True)
        return model, ddp, opt, state

    model, ddp, opt, state = fresh(0)
    _train(ddp, opt, 20, rank, state=state)
    uninterrupted, uninterrupted_state = _flat(model), state.state_dict()

    model, ddp, opt, state = fresh(0)
    _train(ddp, opt, 13, rank, state=state)  # into the first post-warm-up epoch
    checkpoint = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                                "dgc": state.state_dict()})
    model, ddp, opt, state = fresh(1)  # another init: everything must come from the checkpoint
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    state.load_state_dict(checkpoint["dgc"])
    _train(ddp, opt, 7, rank, start=13, state=state)
    resumed = _flat(model)
    # DDP's first iteration after a restart uses its initial bucket layout, so only the
    # per-bucket counters may differ (and the whole tensors' bytes: whether a tensor went
    # whole beside pairs or in a bucket sent dense depends on its bucket)
    resumed_state = state.state_dict()
    for counter in ("sparse_buckets", "dense_buckets", "bytes_dense_tensors"):
        del uninterrupted_state["stats"][counter], resumed_state["stats"][counter]
    return ((resumed - uninterrupted).abs().max().item(),
            _differences(resumed_state, uninterrupted_state),
            any(isinstance(value, torch.Tensor)  # select.py's calibration, whatever it holds
                for value in checkpoint["dgc"]["thresholds"]["body.2.weight"].values()))


def _mlp_256_512_512_10(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def _fresh_ddp_resume_rank(rank, world_size):
    def fresh(seed):
        # A new DDP runs its first iteration with one bucket in registration order, later
        # ones with two rebuilt in gradient-ready order ([4, 2], [0]): the two weights on
        # the sampled-threshold path (512x512, 512x256) reach the hook in opposite orders.
        model = _mlp_256_512_512_10(seed)
        ddp = DDP(model, bucket_cap_mb=1)
        opt = _sgd(model, momentum=0.9, weight_decay=1e-4)
        return model, ddp, opt, dgc.attach(ddp, opt, density=0.01, warmup_epochs=0)

    def run(ddp, opt, steps, start):
        for step in range(start, start + steps):
            g = torch.Generator().manual_seed(1000 * step + rank)
            x, y = torch.randn(32, 256, generator=g), torch.randint(0, 10, (32,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()

    model, ddp, opt, state = fresh(0)
    run(ddp, opt, 15, 0)
    uninterrupted, uninterrupted_state = _flat(model), copy.deepcopy(state.state_dict())
    model, ddp, opt, state = fresh(0)
    run(ddp, opt, 5, 0)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                                "dgc": state.state_dict()})
    model, ddp, opt, state = fresh(1)  # a new DDP model: its first iteration's buckets differ
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    state.load_state_dict(checkpoint["dgc"])
    run(ddp, opt, 10, 5)
    resumed_state = state.state_dict()
    for s in (resumed_state, uninterrupted_state):
        for counter in ("sparse_buckets", "dense_buckets", "bytes_dense_tensors"):
            del s["stats"][counter]
    return (torch.equal(_flat(model), uninterrupted),
            _differences(resumed_state, uninterrupted_state), ddp.bucket_bytes_cap)


def test_resume_into_a_rebuilt_ddp_model_matches_the_uninterrupted_run_bitwise():
    for same_params, state_differences, _ in run_ranks(_fresh_ddp_resume_rank, 2):
        assert same_params
        assert state_differences == []


def _differences(a, b, path="") -> list[str]:
    """Paths at which two nested state dicts differ (tensors compared exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for key in a for d in _differences(a[key], b[key], f"{path}.{key}")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if torch.equal(a, b) else [path]
    return [] if a == b else [path]


def test_state_dict_round_trip_resumes_exactly():
    for max_difference, state_differences, calibrated in run_ranks(_resume_rank, 2):
        assert calibrated  # the large weight went through the sampled threshold
        assert max_difference == 0.0
        # residuals, momenta, threshold calibration, sampler and counters all carried over
        assert state_differences == []


# -- non-finite gradients -------------------------------------------------------------------


def _nonfinite_rank(rank, world_size):
    """An overflow on one rank only: every rank passes the bucket through dense, GradScaler
    skips the step, and the residuals are left as they were."""
    model = MLP()
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
    opt = _sgd(model, momentum=0.9)
    state = dgc.attach(ddp, opt, density=0.02, warmup_epochs=0, min_numel=MIN_NUMEL,
                       check_finite=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    skipped, untouched = [], []
    for step in range(6):
        before = copy.deepcopy(state.state_dict())
        x, y = _batch(rank, step)
        loss = nn.functional.mse_loss(ddp(x), y)
        if step == 3 and rank == 0:
            loss = loss * math.inf
        opt.zero_grad()
        scaler.scale(loss).backward()
        params_before = _flat(model)
        scaler.step(opt)
        scaler.update()
        skipped.append(torch.equal(params_before, _flat(model)))
        after = state.state_dict()
        untouched.append(all(torch.equal(before[key][n], after[key][n])
                             for key in ("momentum", "accumulation") for n in before[key]))
    # a list, not a tensor: the harness queue would pass a tensor through shared memory
    # that dies with the rank process
    return skipped, untouched, state.stats.nonfinite_buckets, _flat(model).tolist()


def test_nonfinite_bucket_passes_through_dense_and_leaves_memory():
    results = run_ranks(_nonfinite_rank, 2)
    for skipped, untouched, nonfinite, _ in results:
        assert skipped == [False, False, False, True, False, False]
        assert untouched[3] and not untouched[4]
        assert nonfinite == 3  # every bucket of that step
    assert results[0][3] == results[1][3]


def _scaled_rank(rank, world_size, adam):
    """The same steps without a scaler and with a GradScaler at 2**16, whose gradients
    (x 1000 here) would pass fp16's 65504 on the wire; the hook is told the scale, as the
    launcher tells it."""
    runs = []
    for scaled in (False, True):
        model = MLP()
        ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
        if adam:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
            options = dict(adam_warmup_steps=2)
        else:
            opt = _sgd(model, momentum=0.9, weight_decay=1e-2)
            options = dict(clip_norm=0.5)
        state = dgc.attach(ddp, opt, density=0.05, warmup_epochs=0, min_numel=MIN_NUMEL,
                           value_dtype="fp16", check_finite=True, **options)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=10**6)
        for step in range(5):
            x, y = _batch(rank, step)
            loss = 1000 * nn.functional.mse_loss(ddp(x), y)
            opt.zero_grad()
            if scaled:
                state.grad_scale = scaler.get_scale()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
        runs.append(_flat(model).tolist())
    return runs, scaler.get_scale(), state.stats.nonfinite_buckets


@pytest.mark.parametrize("adam", [False, True], ids=["sgd-clipped", "adamw-frozen"])
def test_a_grad_scaler_leaves_dgc_the_bits_of_the_unscaled_run(adam):
    """Memory, clipping, Adam's seeded momentum and the fp16 wire all work on unscaled
    gradients, so a power-of-two loss scale changes no bit (it used to overflow the wire to
    inf for good, clip the scaled gradient, and seed Adam's momentum unscaled)."""
    for (plain, scaled), scale, nonfinite in run_ranks(_scaled_rank, 2, adam):
        assert scale == 2.0 ** 16 and nonfinite == 0  # no step skipped
        assert all(math.isfinite(v) for v in scaled)
        assert plain == scaled


def _subgroup_rank(rank, world_size):
    import os
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)  # as torchrun sets it
    groups = [dist.new_group([r]) for r in range(world_size)]  # every rank makes each group
    model = MLP()
    ddp = DDP(model, process_group=groups[rank])
    state = dgc.attach(ddp, _sgd(model, momentum=0.9), density=0.1, min_numel=MIN_NUMEL)
    return state.ranks_per_node


def test_flat_dgc_on_a_data_parallel_subgroup_ignores_the_launchers_node_size():
    """torchrun's LOCAL_WORLD_SIZE counts the job's ranks on a node, not a subgroup's
    (tensor x data parallelism), so it does not make the subgroup's nodes."""
    assert run_ranks(_subgroup_rank, 2) == [1, 1]
