"""attach() options and errors, layer selection, report(), and state_dict round trips."""
import dataclasses
import io

import pytest
import torch
from torch import nn

import sparse_train
from sparse_comm.schema import ConfigError
from sparse_train import SparsityOptions
from tests.sparse_helpers import SCHEDULES, batches, mlp, one_thread, train_step  # noqa: F401


def attach(**options):
    model = mlp()
    return sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), **options)


@pytest.mark.parametrize("options,key", [
    (dict(method="nm", n=4, m=4), "n"),
    (dict(method="nm", n=5, m=4), "n"),
    (dict(target=1.0), "target"),
    (dict(target=-0.1), "target"),
    (dict(method="lottery"), "method"),
    (dict(layers=["0.weight", "decoder.*"]), "layers[1]"),
    (dict(tagret=0.5), "tagret"),
    (dict(block=[4]), "block"),
    (dict(method="gmp", start_step=10, end_step=5), "end_step"),
    (dict(method="dns", dns_start_step=10, dns_iter_stop=5), "dns_iter_stop"),
    (dict(method="dns", dns_c=[1.0, 2.0], layers=["0.weight"]), "dns_c"),
    (dict(method="dns", dns_c=[1.0]), "dns_c"),
])
def test_bad_options_raise_one_line_config_error_naming_the_key(options, key):
    with pytest.raises(ConfigError) as info:
        attach(**options)
    assert info.value.key == key
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    assert f"'{key}'" in str(info.value)


def test_a_wrong_model_optimizer_or_options_is_a_one_line_type_error():
    with pytest.raises(TypeError, match="^sparse_train.attach: expected a torch.nn.Module, "
                                        "got NoneType$"):
        sparse_train.attach(None, None, method="gmp")
    model = mlp()
    with pytest.raises(TypeError, match="expected a torch optimizer, got NoneType"):
        sparse_train.attach(model, None, method="gmp")
    with pytest.raises(TypeError, match="options must be a SparsityOptions or a mapping, got str"):
        sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), "nm")


def test_a_method_no_selected_layer_can_take_is_an_error():
    model = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(ConfigError, match="0.weight: in_features = 6 is not a multiple"):
        sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), method="nm")


def test_options_fields_are_the_attach_keywords():
    options = SparsityOptions(method="gmp", target=0.6, end_step=10, frequency=2)
    from_dataclass = attach(**dataclasses.asdict(options))
    from_mapping = sparse_train.attach(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1),
                                       {"method": "gmp", "target": 0.6}, end_step=10)
    assert from_dataclass.options == options
    assert from_mapping.options.end_step == 10 and from_mapping.options.target == 0.6


def test_default_layers_are_linear_and_conv_weights_only():
    model = nn.ModuleDict({
        "embed": nn.Embedding(10, 8), "conv": nn.Conv2d(4, 8, 3), "norm": nn.LayerNorm(8),
        "fc": nn.Linear(8, 4), "head": nn.Conv1d(4, 4, 1)})
    sp = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert set(sp.params) == {"conv.weight", "fc.weight", "head.weight"}


def test_layer_patterns_glob_over_parameters_with_ndim_at_least_2():
    sp = attach(layers=["0.*", "4.weight"])
    assert set(sp.params) == {"0.weight", "4.weight"}
    with pytest.raises(ConfigError, match="layers\\[0\\]"):
        attach(layers=["0.bias"])


def test_report_lists_density_nm_compliance_bytes_and_skipped_layers():
    sp = attach(method="block", block=[2, 4], target=0.5)
    report = sp.report()
    assert report["method"] == "block" and report["step"] == 0
    assert set(report["layers"]) == {"0.weight", "2.weight"}
    assert report["skipped"] == {"4.weight": "matrix 3x8 is not tiled by 2x4 blocks"}
    layer = report["layers"]["0.weight"]
    assert layer["density"] == 0.5 and layer["nm_compliant"] is False
    assert set(layer["bytes"]) == {"dense", "coo", "csr", "bsr", "ell", "nm"}
    assert layer["bytes"]["bsr"] < layer["bytes"]["dense"]


def checkpoint(model, opt, sp) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()},
               buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("method", ["gmp", "dns", "iht", "nm"])
def test_state_dict_round_trip_restores_masks_and_resumes_identically(method):
    data = batches(16)

    def fresh(seed):
        model = mlp(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, sparse_train.attach(model, opt, method=method, **SCHEDULES[method])

    model, opt, sp = fresh(0)
    for x, y in data[:8]:
        train_step(model, opt, x, y)
    saved = torch.load(io.BytesIO(checkpoint(model, opt, sp)), weights_only=False)

    model2, opt2, sp2 = fresh(seed=5)  # different weights, so different first masks
    sp2.load_state_dict(saved["sp"])
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert sp2.step == 8
    assert all(sp2.masks[n].equal(m) for n, m in sp.masks.items())

    for x, y in data[8:]:
        train_step(model, opt, x, y)
        train_step(model2, opt2, x, y)
        assert all(sp2.masks[n].equal(m) for n, m in sp.masks.items()), sp.step
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_state_dict_rejects_another_method():
    with pytest.raises(ValueError, match="method 'gmp'"):
        attach(method="nm").load_state_dict(attach(method="gmp").state_dict())


def test_detach_stops_mask_updates():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparse_train.attach(model, opt, method="magnitude", start_step=2)
    sp.detach()
    for x, y in batches(4):
        train_step(model, opt, x, y)
    assert sp.step == 0 and all((p != 0).all() for p in model.parameters())


def test_mask_multiplier_follows_the_mask_through_replacement_and_in_place_writes():
    """mask_ zeroes exactly the pruned entries; its cached factor is remade when the mask is
    replaced or written in place, never served stale."""
    sp = attach(method="nm", n=2, m=4, nm_start_step=0)
    name = next(iter(sp.params))
    shape = sp.params[name].shape

    def check():
        t = torch.randn(shape)
        assert torch.equal(sp.mask_(name, t.clone()), t * sp.masks[name])
        flat = t.reshape(-1)
        assert torch.equal(sp.mask_(name, flat.clone()), flat * sp.masks[name].reshape(-1))

    check()
    sp.masks[name] = torch.rand(shape) < 0.3  # replaced
    check()
    sp.masks[name][0].fill_(False)  # written in place
    check()
    assert sp.multiplier(name, torch.float64).dtype == torch.float64


def test_per_mask_values_are_made_again_only_when_their_mask_changes():
    from sparse_train.live import PerMask
    made = []
    cache = PerMask()

    def value(mask):
        return cache.get("w", mask, lambda: made.append(int(mask.sum())) or len(made))

    mask = torch.tensor([True, False, True])
    assert value(mask) == value(mask) == 1 and made == [2]  # same tensor, unchanged: kept
    mask[1] = True  # written in place
    assert value(mask) == 2 and made == [2, 3]
    mask = mask.clone()  # equal contents, but a new tensor
    assert value(mask) == 3 and made == [2, 3, 3]


@pytest.mark.parametrize("method", ["nm", "iht", "dns", "dsd", "gmp"])
@pytest.mark.parametrize("closure_as", ["keyword", "positional"])
def test_step_with_a_closure_equals_backward_then_step(method, closure_as):
    """Lightning (and LBFGS) run forward and backward inside step(closure), after the step
    pre-hooks: the masks must still see this step's gradients, and a soft method must run
    the forward at W * mask."""
    finals = []
    for use_closure in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sparse_train.attach(model, opt, method=method, **SCHEDULES[method])
        for x, y in batches(20):
            if not use_closure:
                train_step(model, opt, x, y)
                continue

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure=closure) if closure_as == "keyword" else opt.step(closure)
        finals.append(([p.detach().clone() for p in model.parameters()],
                       [s["momentum_buffer"].clone() for s in opt.state.values()]))
    (params, momenta), (closure_params, closure_momenta) = finals
    assert all(torch.equal(a, b) for a, b in zip(params, closure_params))
    assert all(torch.equal(a, b) for a, b in zip(momenta, closure_momenta))
