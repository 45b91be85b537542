"""Structured sparsity: coupled channel groups, channel / slimming / group-lasso / bank
methods, the penalties, and shrink's smaller model with the masked model's outputs."""
import io

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sparse_train
from launch.models import ModelConfig, build_model
from sparse_comm.schema import ConfigError
from sparse_train import masks as rules
from sparse_train import regularizers
from sparse_train.channels import channel_groups
from tests.distributed import run_ranks
from tests.sparse_helpers import batches, mlp, one_thread, train_step  # noqa: F401

STRUCTURED = {
    "channel": dict(target=0.5, schedule="gmp", start_step=2, end_step=10, frequency=4),
    "slimming": dict(target=0.4, scope="global", penalty=1e-2, start_step=6),
    "group_lasso": dict(penalty=0.1, group_threshold=0.3, schedule="gmp", start_step=4,
                        end_step=12, frequency=4),
    "bank": dict(target=0.75, bank_size=4, schedule="gmp", start_step=2, end_step=14,
                 frequency=2),
}


def conv_net(seed: int = 0) -> nn.Sequential:
    """Conv-BN-ReLU twice, pool, flatten into a Linear, then the classifier: every kind of
    coupling (conv -> BN -> conv, conv -> flatten -> linear, linear -> linear)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))


def image_batches(count: int, seed: int = 1, size: int = 16):
    teacher = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(size, 1, 8, 8, generator=gen)
        out.append((x, (x.flatten(1) @ teacher).argmax(1)))
    return out


def attached(model, method: str, **options):
    """``model``, its SGD-with-momentum optimizer and a sparsifier running ``method``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, sparse_train.attach(model, opt, method=method, **options)


def flops(model, x) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


# --- channel groups -------------------------------------------------------------------

def test_channel_groups_follow_batchnorm_flatten_and_stop_at_residual_adds():
    groups, reasons = channel_groups(conv_net())
    assert set(groups) == {"0.weight", "3.weight", "8.weight"}
    assert groups["0.weight"].norms == ("1",) and groups["3.weight"].norms == ("4",)
    assert [(c.module, c.span) for c in groups["3.weight"].consumers] == [("8", 16)]
    assert "output" in reasons["10.weight"]

    resnet = build_model(ModelConfig(name="resnet20"), (1, 28, 28), 10)
    groups, reasons = channel_groups(resnet)
    assert sorted(groups) == sorted(f"stage{s}.{b}.conv1.weight"
                                    for s in (1, 2, 3) for b in range(3))
    assert groups["stage2.1.conv1.weight"].consumers[0].module == "stage2.1.conv2"
    assert "add" in reasons["stage2.1.conv2.weight"] and "add" in reasons["conv1.weight"]


class _Wired(nn.Module):
    """A producer and a reader, wired by ``forward`` (the trace has no shapes)."""

    def __init__(self, producer: nn.Module, reader: nn.Module, forward):
        super().__init__()
        self.producer, self.reader, self.wiring = producer, reader, forward

    def forward(self, x):
        return self.wiring(self, x)


@pytest.mark.parametrize("model, reason", [
    # per token, then flattened: feature t * C + c, not the c * T + t a conv's flatten gives
    (_Wired(nn.Linear(4, 6), nn.Linear(30, 3),
            lambda m, x: m.reader(torch.relu(m.producer(x)).flatten(1))), "flatten"),
    # a Linear over a Conv1d's output reads its positions, not its channels
    (_Wired(nn.Conv1d(3, 8, 1), nn.Linear(8, 2),
            lambda m, x: m.reader(torch.relu(m.producer(x))).sum(1)), "reads the last"),
    # dimension -2 of a Conv1d's output is its channels: no pooling over space
    (_Wired(nn.Conv1d(3, 8, 1), nn.Linear(8, 2),
            lambda m, x: m.reader(m.producer(x).mean(dim=-2))), "mean"),
    # a Conv2d over a Linear's output reads dimension 1, not the Linear's channels
    (_Wired(nn.Linear(8, 8), nn.Conv2d(8, 4, 1),
            lambda m, x: m.reader(m.producer(x))), "reads dimension 1"),
])
def test_channels_stay_where_the_trace_cannot_tell_which_dimension_holds_them(model, reason):
    groups, reasons = channel_groups(model)
    assert "producer.weight" not in groups
    assert reason in reasons["producer.weight"]


def test_channel_groups_follow_linear_chains_and_a_spatial_mean_from_either_end():
    tokens = _Wired(nn.Linear(4, 6), nn.Linear(6, 3),  # per token: the last dimension
                    lambda m, x: m.reader(torch.relu(m.producer(x))))
    assert channel_groups(tokens)[0]["producer.weight"].consumers[0].span == 1
    pooled = _Wired(nn.Conv2d(3, 8, 3), nn.Linear(8, 2),
                    lambda m, x: m.reader(m.producer(x).mean(dim=(-1, 2))))
    assert channel_groups(pooled)[0]["producer.weight"].consumers[0].span == 1
    model, opt, sp = attached(tokens, "channel", target=0.5)
    x = torch.randn(5, 7, 4)
    with torch.no_grad():
        assert torch.allclose(sparse_train.shrink(model, sp)(x), model(x), atol=1e-6)


def test_a_model_torch_fx_cannot_trace_is_a_one_line_error_for_channel_methods():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x) if x.sum() > 0 else x)

    model = Branchy()
    with pytest.raises(ConfigError) as info:
        sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            method="channel")
    assert info.value.key == "method" and "torch.fx" in str(info.value)
    assert "\n" not in str(info.value)
    # group lasso does not need the coupling: it penalises and masks the weights alone
    sp = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             method="group_lasso")
    assert set(sp.params) == {"a.weight", "b.weight"}


def test_slimming_leaves_layers_without_batchnorm_dense_and_says_why():
    model = conv_net()
    sp = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             method="slimming")
    assert "BatchNorm" in sp.report()["layers_kept_whole"]["8.weight"]
    assert "output" in sp.report()["layers_kept_whole"]["10.weight"]
    assert set(sp.params) == {"0.weight", "3.weight", "8.weight"}  # 8 reads 3's channels
    assert set(sp.skipped) == {"10.weight"}


def test_slimming_names_a_batchnorm_without_scale_instead_of_crashing():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    sp = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             method="slimming")
    assert "affine=False" in sp.report()["layers_kept_whole"]["0.weight"]
    assert "0" not in sp.report()["channels"] and "3" in sp.report()["channels"]
    model.eval()
    with torch.no_grad():
        x = torch.randn(2, 1, 8, 8)
        assert torch.allclose(sparse_train.shrink(model, sp)(x), model(x), atol=1e-6)


@pytest.mark.parametrize("stats", [True, False])
def test_shrink_slices_a_batchnorm_without_affine_parameters(stats):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8, affine=False,
                                                               track_running_stats=stats),
                          nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    sp = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             method="channel", target=0.5)
    model.eval()
    with torch.no_grad():
        x = torch.randn(3, 1, 8, 8)
        small = sparse_train.shrink(model, sp)
        assert small[1].num_features == 4
        assert torch.allclose(small(x), model(x), atol=1e-6)


# --- masks ----------------------------------------------------------------------------

def test_channel_pruning_removes_rows_and_the_columns_that_read_them():
    model = conv_net()
    with torch.no_grad():
        model[0].weight[[1, 4, 6]] *= 0.01  # the three smallest filters of conv 0
    sp = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             method="channel", target=0.375, layers=["0.weight"])
    rows = sp.masks["0.weight"].flatten(1).all(1)
    assert rows.tolist() == [i not in (1, 4, 6) for i in range(8)]
    assert not sp.masks["0.weight"].flatten(1)[~rows].any()
    columns = sp.masks["3.weight"].transpose(0, 1).flatten(1)
    assert columns.all(1).equal(rows) and not columns[~rows].any()
    assert sp.report()["channels"]["0"] == {"channels": 8, "kept": 5}


def test_slimming_removes_the_smallest_batchnorm_scales_across_layers():
    model = conv_net()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.9, 0.01, 0.8, 0.7, 0.02, 0.6, 0.5, 0.4]))
        model[4].weight.copy_(torch.tensor([0.03, 0.9, 0.9, 0.9, 0.9, 0.04, 0.9, 0.9]))
    sp = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             method="slimming", target=0.25, scope="global")
    removed0 = (~sp.masks["0.weight"].flatten(1).any(1)).nonzero().flatten().tolist()
    removed3 = (~sp.masks["3.weight"].flatten(1).any(1)).nonzero().flatten().tolist()
    assert removed0 == [1, 4] and removed3 == [0, 5]


def test_per_layer_targets_prune_each_layer_to_its_own_ratio():
    model = mlp()
    sp = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             method="magnitude", layers=["0.*", "2.*", "4.*"],
                             target=[0.25, 0.5, 0.75])
    densities = {n: m.float().mean().item() for n, m in sp.masks.items()}
    assert densities == {"0.weight": 0.75, "2.weight": 0.5, "4.weight": 0.25}
    with pytest.raises(ConfigError, match="'scope'"):
        sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            layers=["0.*"], target=[0.5], scope="global")



@pytest.mark.parametrize("method", ["channel", "slimming", "group_lasso"])
def test_per_layer_targets_name_the_producers_not_the_layers_that_read_them(method):
    """What ``launch.sensitivity`` proposes for a channel scan: one target per producer.
    The layers that read a pruned channel (here 8.weight) have no pattern of their own."""
    model = conv_net()
    sp = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             method=method, layers=["0.weight", "3.weight"],
                             target=[0.5, 0.25])
    assert {"3.weight", "8.weight"} <= set(sp.params)
    if method != "group_lasso":  # its groups go by the penalty, not by target
        assert sp.report()["channels"]["0"]["kept"] == 4
        assert sp.report()["channels"]["3"]["kept"] == 6

def test_bank_masks_keep_the_same_count_in_every_bank():
    w = torch.randn(6, 5, 3, 3)
    with pytest.raises(AssertionError):
        rules.bank_mask(w, 0.5, 4)  # 5 channels: not cut into banks of 4
    w = torch.randn(6, 8, 3, 3)
    mask = rules.bank_mask(w, 0.6, 4)
    assert (rules.bank_counts(mask, 4) == 2).all()  # round(0.6 * 4) = 2 pruned of 4
    kept = rules.nm_matrix(w.abs()).reshape(6, -1, 4).topk(2, dim=-1).values.sum()
    assert torch.isclose((w.abs() * mask).sum(), kept)


def test_bank_training_keeps_every_bank_balanced_through_the_schedule():
    model, opt, sp = attached(mlp(), "bank", **STRUCTURED["bank"])
    counts_seen = set()
    for x, y in batches(16):
        train_step(model, opt, x, y)
        for name, mask in sp.masks.items():
            counts = rules.bank_counts(mask, 4)
            assert (counts == counts.flatten()[0]).all(), (name, sp.step)
            counts_seen.add(int(counts.flatten()[0]))
            assert (rules.bank_counts(sp.params[name] != 0, 4) <= counts).all()
    assert counts_seen == {4, 3, 2, 1} and sp.fixed_masks() is not None
    assert all(layer["balanced"] for layer in sp.report()["banks"].values())


# --- penalties ------------------------------------------------------------------------

def test_group_lasso_term_sums_filter_channel_and_shape_norms():
    model = conv_net()
    w = model[3].weight
    expected = (w.flatten(1).norm(dim=1).sum() + w.transpose(0, 1).flatten(1).norm(dim=1).sum()
                + w.norm(dim=0).sum())
    term = regularizers.group_lasso(model, layers=["3.weight"])
    assert torch.isclose(term, expected)
    assert torch.isclose(regularizers.group_lasso({"w": w}, ["filters"]),
                         w.flatten(1).norm(dim=1).sum())


@pytest.mark.parametrize("method", ["group_lasso", "slimming"])
def test_the_methods_penalty_equals_adding_the_term_to_the_loss(method):
    """attach adds the penalty's gradient before the step; a plain loop adds the term to
    the loss: the same parameters after several momentum steps."""
    penalty = 0.05
    a, b = conv_net(), conv_net()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    sparse_train.attach(a, opt_a, method=method, penalty=penalty, start_step=100)
    for x, y in image_batches(5):
        train_step(a, opt_a, x, y)
        opt_b.zero_grad()
        loss = nn.functional.cross_entropy(b(x), y)
        if method == "group_lasso":
            loss = loss + penalty * regularizers.group_lasso(b)
        else:
            loss = loss + penalty * regularizers.batchnorm_l1(b, ["1", "4"])
        loss.backward()
        opt_b.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_group_lasso_removes_groups_its_penalty_zeroed_and_couples_channels():
    model, opt, sp = attached(conv_net(), "group_lasso", **STRUCTURED["group_lasso"])
    for x, y in image_batches(16):
        train_step(model, opt, x, y)
    removed = sp.report()["groups_removed"]
    assert any(v > 0 for row in removed.values() for v in row.values()), removed
    for group in sp.method.groups:  # a removed filter takes the columns that read it
        rows = sp.masks[group.weight].flatten(1).any(1)
        for consumer in group.consumers:
            cols = sp.masks[f"{consumer.module}.weight"].transpose(0, 1).flatten(1).any(1)
            assert cols.view(group.channels, consumer.span).any(1).equal(rows)


# --- shrink ---------------------------------------------------------------------------

def _perturb_batchnorm(model):
    """Running statistics and affine parameters far from their defaults."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen))


@pytest.mark.parametrize("name,method,shape", [
    ("conv_net", "channel", (1, 8, 8)), ("conv_net", "slimming", (1, 8, 8)),
    ("conv_net", "group_lasso", (1, 8, 8)), ("lenet5", "channel", (1, 28, 28)),
    ("resnet20", "slimming", (1, 16, 16)), ("lenet300", "channel", (1, 28, 28))])
def test_shrink_builds_a_smaller_model_with_the_masked_models_outputs(name, method, shape):
    model = conv_net() if name == "conv_net" else build_model(ModelConfig(name=name), shape, 10)
    _perturb_batchnorm(model)
    options = dict(STRUCTURED.get(method, {}), target=0.5) if method != "group_lasso" \
        else dict(penalty=0.1, group_threshold=0.8, start_step=3)
    options.update(start_step=3, schedule="oneshot")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = sparse_train.attach(model, opt, method=method, **options)
    for _ in range(4):
        x = torch.randn(8, *shape)
        train_step(model, opt, x, torch.randint(0, 3, (8,)))
    model.eval()
    small = sparse_train.shrink(model, sp)
    x = torch.randn(32, *shape)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)
    removed = sum(c["channels"] - c["kept"] for c in sp.report()["channels"].values())
    assert removed > 0
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert flops(small, x) < flops(model, x)


def test_shrink_without_a_sparsifier_removes_channels_whose_readers_are_zero():
    model = conv_net()
    _perturb_batchnorm(model)
    with torch.no_grad():
        model[3].weight[:, [2, 5]] = 0  # conv 3 no longer reads channels 2 and 5 of conv 0
        model[0].weight[7] = 0  # filter 7 is zero but still read: its bias carries on
    model.eval()
    small = sparse_train.shrink(model)
    assert small[0].out_channels == 6 and small[1].num_features == 6
    assert small[3].in_channels == 6
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)


def test_shrink_refuses_a_non_module_and_another_models_sparsifier():
    model = conv_net()
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got NoneType"):
        sparse_train.shrink(None)
    with pytest.raises(TypeError, match="expected a Sparsifier or None, got str"):
        sparse_train.shrink(model, "x")
    other = mlp()
    sp = sparse_train.attach(other, torch.optim.SGD(other.parameters(), lr=0.1), method="gmp")
    with pytest.raises(ValueError, match="masks are not this model's"):
        sparse_train.shrink(model, sp)


# --- checkpoints and the nonzero method -----------------------------------------------

@pytest.mark.parametrize("method", list(STRUCTURED))
def test_structured_state_dict_round_trip_resumes_identically(method):
    data = image_batches(14)

    def fresh(seed):
        options = dict(STRUCTURED[method], bank_size=8) if method == "bank" \
            else STRUCTURED[method]
        return attached(conv_net(seed), method, **options)

    model, opt, sp = fresh(0)
    for x, y in data[:5]:
        train_step(model, opt, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()},
               buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    model2, opt2, sp2 = fresh(seed=5)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sp2.load_state_dict(saved["sp"])
    for x, y in data[5:]:
        train_step(model, opt, x, y)
        train_step(model2, opt2, x, y)
        assert all(sp2.masks[n].equal(m) for n, m in sp.masks.items()), sp.step
    assert any(not m.all() for m in sp.masks.values())
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_nonzero_method_keeps_the_zeros_the_weights_start_with():
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand_like(p) < 0.3)
    zeros = {n: p == 0 for n, p in model.named_parameters() if p.dim() == 2}
    model, opt, sp = attached(model, "nonzero")
    for x, y in batches(5):
        train_step(model, opt, x, y)
    for name, p in sp.params.items():
        assert sp.masks[name].equal(~zeros[name]) and (p[zeros[name]] == 0).all()
    assert sp.fixed_masks() is not None


# --- DDP ------------------------------------------------------------------------------

def _structured_on_ranks(rank, world_size):
    import hashlib

    from torch.nn.parallel import DistributedDataParallel
    out = {}
    for method, options in STRUCTURED.items():
        model, opt, sp = attached(DistributedDataParallel(conv_net(seed=0)), method, **options)
        torch.manual_seed(100 + rank)  # each rank its own data and global RNG stream
        sums = []
        for x, y in image_batches(14, seed=10 + rank):
            train_step(model, opt, x, y)
            digest = hashlib.sha256()
            for name, mask in sorted(sp.masks.items()):
                digest.update(name.encode() + mask.numpy().tobytes())
            sums.append(digest.hexdigest()[:16])
        weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                          for p in model.parameters())).hexdigest()[:16]
        out[method] = (sums, weights, sp.report()["density"])
    return out


def test_structured_masks_and_weights_agree_on_two_gloo_ranks_after_every_step():
    rank0, rank1 = run_ranks(_structured_on_ranks, 2, timeout=120)
    for method in STRUCTURED:
        sums0, weights0, density = rank0[method]
        sums1, weights1, _ = rank1[method]
        for step, (a, b) in enumerate(zip(sums0, sums1), 1):
            assert a == b, f"{method}: masks differ after step {step}"
        assert weights0 == weights1, f"{method}: weights differ (penalty gradients?)"
        assert len(set(sums0)) > 1 and density < 1.0, f"{method}: masks never changed"
