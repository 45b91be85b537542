"""DGC's pure parts without processes: memory, codec, schedule, bucket plans, option errors."""
import itertools

import pytest
import torch
import torch.nn as nn

import dgc
from dgc import codec, memory
from dgc.plan import make_plan
from dgc.options import DGCOptions
from dgc.schedule import sparse_count, topk_count
from sparse_comm.schema import ConfigError, build

# -- memory ---------------------------------------------------------------------------------


def test_clip_scales_down_only_above_the_threshold():
    g = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(memory.clip_(g.clone(), 1.0), torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(memory.clip_(g.clone(), 10.0), g)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_matches_torch_sgd(nesterov):
    """With nothing dropped, the accumulated update of each step is torch.optim.SGD's step."""
    torch.manual_seed(0)
    p = torch.zeros(5, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0, momentum=0.9, nesterov=nesterov)
    u, v = torch.zeros(5), torch.zeros(5)
    for _ in range(4):
        g = torch.randn(5)
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        memory.accumulate_(u, v, g, 0.9, nesterov)
        torch.testing.assert_close(v, before - p.detach(), rtol=0, atol=1e-6)
        v.zero_()  # everything sent


@pytest.mark.parametrize("nesterov", [False, True])
def test_compressor_accumulating_chunk_by_chunk_equals_one_pass(nesterov):
    """Compressor.compress folds g into u and v chunk by chunk beside the selection on large
    tensors; the memory and the selection are those of the plain order (accumulate, then
    select) step after step."""
    from dgc.select import ThresholdState, select_topk
    from sparse_comm import draws
    numel, k = 1_000_003, 1000
    comp = dgc.Compressor([("w", torch.zeros(numel))], world_size=1, rank=0, momentum=0.9,
                          nesterov=nesterov, seed=3)
    u, v = torch.zeros(numel), torch.zeros(numel)
    state = ThresholdState()
    for step in range(3):
        g = torch.randn(numel, generator=torch.Generator().manual_seed(step))
        indices, values = comp.compress("w", g.clone(), k)
        memory.accumulate_(u, v, g, 0.9, nesterov)
        ref_indices, ref_values = select_topk(v, k, state=state,
                                              draw=draws.integer(3, 0, "w", step))
        memory.mask_(u, v, ref_indices, ref_values, True)
        assert torch.equal(indices, ref_indices) and torch.equal(values, ref_values)
        sd = comp.state_dict()
        assert torch.equal(sd["momentum"]["w"], u) and torch.equal(sd["accumulation"]["w"], v)


def test_mask_zeroes_sent_positions_of_v_and_only_with_masking_u():
    u, v = torch.arange(1.0, 6.0), torch.arange(10.0, 15.0)
    idx = torch.tensor([1, 3])
    for masking, u_expected in [(True, [1.0, 0, 3, 0, 5]), (False, [1.0, 2, 3, 4, 5])]:
        uu, vv = u.clone(), v.clone()
        memory.mask_(uu, vv, idx, vv[idx], masking)
        assert vv.tolist() == [10.0, 0, 12, 0, 14]
        assert uu.tolist() == u_expected


def test_mask_keeps_the_rounding_error_of_narrow_values():
    v = torch.tensor([1.0 + 2**-12, 2.0])
    sent = v[:1].to(torch.float16)  # rounds to 1.0
    memory.mask_(torch.zeros(2), v, torch.tensor([0]), sent, True)
    assert v.tolist() == [2**-12, 2.0]


# -- codec ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value,index", itertools.product(codec.VALUE_DTYPES, codec.INDEX_DTYPES))
@pytest.mark.parametrize("count", [1, 3, 8])
def test_pack_unpack_round_trip_all_dtypes(value, index, count):
    layout = codec.Layout(count, codec.VALUE_DTYPES[value], codec.INDEX_DTYPES[index])
    assert layout.nbytes % 8 == 0
    ranks = []
    for r in range(3):
        idx = torch.randperm(1000)[:count] + r
        vals = torch.randn(count).to(layout.value_dtype)
        packed = codec.pack(idx, vals, layout)
        assert packed.dtype == torch.uint8 and packed.numel() == layout.nbytes
        ranks.append((idx, vals, packed))
    indices, values = codec.unpack(torch.cat([p for *_, p in ranks]), layout, 3)
    for r, (idx, vals, _) in enumerate(ranks):
        assert torch.equal(indices[r].long(), idx)
        assert torch.equal(values[r], vals)


def test_scatter_sum_adds_every_rank():
    out = torch.zeros(4)
    codec.scatter_sum_(out, torch.tensor([[0, 2], [2, 3]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert out.tolist() == [1.0, 0.0, 5.0, 4.0]


def test_scatter_sum_skips_the_empty_slots_without_an_extra_entry():
    out = torch.tensor([-0.0, 0.0, 0.0, 0.0])
    indices = torch.tensor([[4, 2, 4], [2, 3, 4]])  # 4, past the end, marks an empty slot
    values = torch.tensor([[9.0, 2.0, 7.0], [3.0, 4.0, 5.0]])
    codec.scatter_sum_(out, indices, values, empty=4)
    assert out.tolist() == [0.0, 0.0, 5.0, 4.0]
    assert torch.signbit(out[0])  # the empties added -0.0: every bit of index 0 unchanged


# -- schedule -------------------------------------------------------------------------------


def _densities(options: dict, epochs: int = 0, steps: int = 0, total: int | None = None):
    comp = dgc.Compressor([("w", torch.zeros(4, 4))], world_size=1, rank=0, density=0.001,
                          **options)
    if total is not None:
        comp.set_total_steps(total)
    out = []
    for e in range(epochs):
        comp.set_epoch(e)
        out.append(comp.density)
    for _ in range(steps):
        out.append(comp.density)
        comp.end_step()
    return out


def test_warmup_follows_the_reference_geometric_schedule_by_default():
    # the reference: one stage per warm-up epoch, target ** ((e + 1) / (W + 1))
    got = _densities({}, epochs=6)
    want = [0.001 ** (e / 5) for e in (1, 2, 3, 4)] + [0.001, 0.001]
    assert got == pytest.approx(want)
    assert _densities({"warmup_epochs": 0}, epochs=2) == [0.001, 0.001]
    assert _densities({"warmup_epochs": 2}, epochs=3) == pytest.approx(
        [0.001 ** (1 / 3), 0.001 ** (2 / 3), 0.001])


def test_the_papers_schedule_by_name_and_explicit_stages():
    assert _densities({"warmup_densities": "paper"}, epochs=5) == [
        0.25, 0.0625, 0.015625, 0.004, 0.001]
    # one epoch per explicit stage unless a length is given
    assert _densities({"warmup_densities": [0.5, 0.1]}, epochs=3) == [0.5, 0.1, 0.001]
    assert _densities({"warmup_densities": [0.01], "warmup_epochs": 2}, epochs=3) == [
        0.01, 0.01, 0.001]


def test_warmup_in_steps_and_as_a_fraction_of_the_run():
    # 8 steps, the paper's 4 geometric stages of 2 steps each
    stages = [0.001 ** (i / 5) for i in (1, 2, 3, 4)]
    got = _densities({"warmup_steps": 8}, steps=10)
    assert got == pytest.approx([d for d in stages for _ in (0, 1)] + [0.001, 0.001])
    got = _densities({"warmup_fraction": 0.1, "warmup_densities": [0.01]}, steps=12,
                     total=100)
    assert got == [0.01] * 10 + [0.001] * 2
    with pytest.raises(RuntimeError, match="set_total_steps"):
        _densities({"warmup_fraction": 0.1}, steps=1)


def test_the_step_counter_survives_a_state_dict_round_trip():
    comp = dgc.Compressor([("w", torch.zeros(4, 4))], world_size=1, rank=0, warmup_steps=8)
    for _ in range(5):
        comp.end_step()
    other = dgc.Compressor([("w", torch.zeros(4, 4))], world_size=1, rank=0, warmup_steps=8)
    other.load_state_dict(comp.state_dict())
    assert other.step == 5 and other.density == comp.density


def test_a_warmup_length_given_twice_is_a_config_error():
    with pytest.raises(ConfigError, match="given twice"):
        build(DGCOptions, {"warmup_epochs": 1, "warmup_steps": 10})


def test_topk_count_is_at_least_one_and_at_most_all():
    assert topk_count(100, 1e-6) == 1
    assert topk_count(100, 1.0) == 100
    assert topk_count(5000, 0.001) == 5


def test_topk_count_rounds_up_as_the_reference_does():
    # the reference: num_selects = int(math.ceil(numel * compress_ratio))
    assert topk_count(1500, 0.001) == 2  # round() would give 2 too (banker's) ...
    assert topk_count(1400, 0.001) == 2  # ... but 1 here
    assert topk_count(235200, 0.001) == 236  # LeNet-300's fc1 at 0.1%: 235.2


def test_a_tensor_whose_k_would_be_every_entry_goes_dense():
    """Density 1.0 must not send a tensor as (index, value) pairs: with momentum masking
    that would zero its momentum every step (SGD without momentum)."""
    assert sparse_count((64, 32), 2048, 1.0, 100) is None
    assert sparse_count((64, 32), 1024, 1.0, 100) is None  # 1024 live entries, all sent
    assert sparse_count((64, 32), 2048, 0.5, 100) == 1024
    assert sparse_count((64,), 64, 0.1, 1) is None and sparse_count((4, 4), 16, 0.1, 100) is None
    plan = _plan(1.0, 2, dense_fallback=False)
    assert not plan.compressed and plan.layout.count == 0


# -- bucket plan ----------------------------------------------------------------------------


def _plan(density, world_size, **options):
    shapes = [torch.Size([64, 32]), torch.Size([64]), torch.Size([4, 4])]
    return make_plan(["w", "b", "small"], shapes, density, world_size,
                     build(DGCOptions, {"min_numel": 100, **options}))


def test_plan_sends_small_and_1d_tensors_dense():
    plan = _plan(0.01, 2)
    # k = ceil(2048 * 0.01) = ceil(20.48), as the reference rounds (round would give 20)
    assert [(s.name, s.k) for s in plan.slots] == [("w", 21), ("b", None), ("small", None)]
    assert [s.offset for s in plan.slots] == [0, 2048, 2112]


def test_plan_falls_back_to_dense_above_break_even():
    # fp32 values, int32 indices, 2 ranks: break-even density 2*4 / (2*(4+4)) = 0.5
    assert _plan(0.4, 2).sparse
    assert not _plan(0.6, 2).sparse
    assert _plan(0.6, 2, dense_fallback=False).sparse
    assert not _plan(0.4, 4).sparse  # break-even 0.25 on 4 ranks


# -- option and optimizer errors ------------------------------------------------------------


@pytest.mark.parametrize("options,key", [
    ({"density": 0.0}, "density"),
    ({"density": 1.5}, "density"),
    ({"densty": 0.1}, "densty"),
    ({"value_dtype": "fp8"}, "value_dtype"),
    ({"warmup_densities": [0.5, 2.0]}, "warmup_densities[1]"),
    ({"clip_norm": -1.0}, "clip_norm"),
    ({"min_numel": 0}, "min_numel"),
])
def test_bad_options_name_the_key(options, key):
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")) as err:
        dgc.DGCState(model=model, **options)
    assert err.value.key == key
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        dgc.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), **options)


def test_options_build_from_a_config_mapping():
    opts = build(DGCOptions, {"density": 0.01, "warmup_epochs": 2, "value_dtype": "fp16"})
    assert (opts.density, opts.warmup_epochs, opts.value_dtype) == (0.01, 2.0, "fp16")


@pytest.mark.parametrize("make,error,match", [
    (lambda ps: torch.optim.RMSprop(ps), TypeError, "SGD, Adam and AdamW .* got RMSprop"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1), ValueError,
     "dampening"),
    (lambda ps: torch.optim.SGD([{"params": ps[:1]}, {"params": ps[1:], "momentum": 0.5}],
                                lr=0.1, momentum=0.9), ValueError, "differ in"),
])
def test_unsupported_optimizers_are_rejected(make, error, match):
    model = nn.Linear(2, 2)
    with pytest.raises(error, match=match):
        dgc.attach(model, make(list(model.parameters())))


def test_attach_needs_a_ddp_model():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        dgc.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_attach_twice_is_one_line_naming_the_hook():
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        dgc.attach(model, opt)
        with pytest.raises(RuntimeError, match="already has a communication hook") as err:
            dgc.attach(model, opt)
        assert "\n" not in str(err.value)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3)])  # frozen_variance, the default
def test_an_optimizer_holding_parameters_outside_the_model_is_one_line(make):
    """A learnable loss temperature, say: DDP does not average it, and DGC's hook would
    never apply its momentum."""
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
        temperature = nn.Parameter(torch.ones(()))
        with pytest.raises(ValueError, match="1 parameter.* not the DDP model's") as err:
            dgc.attach(model, make(list(model.parameters()) + [temperature]))
        assert "\n" not in str(err.value)
    finally:
        torch.distributed.destroy_process_group()


def test_channels_last_with_a_sparsifier_or_frozen_adam_is_one_line():
    """DDP's bucket holds a channels_last gradient in NHWC order; masks and Adam's moments
    index the logical order. Plain DGC is fine (an elementwise pass over the bucket)."""
    import sparse_train
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        def model():
            net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
            return net.to(memory_format=torch.channels_last)
        net = model()
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        sp = sparse_train.attach(net, opt, method="magnitude", target=0.5)
        with pytest.raises(ValueError, match="masks 0.weight, which is not contiguous"):
            dgc.attach(ddp, opt, sparsifier=sp)
        net = model()
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        with pytest.raises(ValueError, match="0.weight is not contiguous .* frozen_variance"):
            dgc.attach(ddp, torch.optim.AdamW(net.parameters(), lr=1e-3))
        net = model()
        dgc.attach(torch.nn.parallel.DistributedDataParallel(net),
                   torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    finally:
        torch.distributed.destroy_process_group()


def test_attach_after_a_builtin_hook_is_one_line():
    """DDP's ``_register_builtin_comm_hook`` leaves ``_comm_hooks`` empty; only its logger
    records the hook, and attach must still refuse before building any state."""
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
        model._register_builtin_comm_hook(torch.distributed.BuiltinCommHookType.FP16_COMPRESS)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with pytest.raises(RuntimeError, match="already has a communication hook") as err:
            dgc.attach(model, opt)
        assert "\n" not in str(err.value)
    finally:
        torch.distributed.destroy_process_group()
