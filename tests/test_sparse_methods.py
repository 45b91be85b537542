"""Each method's schedule, run through real optimizer steps on a tiny model."""
import pytest
import torch

import sparse_train
from sparse_train.methods import cubic_sparsity
from sparse_train.methods.dns import dns_threshold
from tests.sparse_helpers import (  # noqa: F401
    METHODS, SCHEDULES, batches, mlp, one_thread, train_step)

OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2),
}


def densities(sparsifier):
    return {name: mask.float().mean().item() for name, mask in sparsifier.masks.items()}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("method", METHODS)
def test_masked_weights_stay_zero_after_every_step(method, optimizer):
    model = mlp()
    opt = OPTIMIZERS[optimizer](model.parameters())
    sp = sparse_train.attach(model, opt, method=method, **SCHEDULES[method])
    pruned_ever = False
    for x, y in batches(24):
        train_step(model, opt, x, y)
        for name, p in sp.params.items():
            assert (p[~sp.masks[name]] == 0).all(), (name, sp.step)
            pruned_ever |= bool((~sp.masks[name]).any())
            if method != "dns" or sp.step >= SCHEDULES["dns"]["dns_iter_stop"]:
                for value in opt.state[p].values():  # no stale momentum to resurrect them
                    if value.shape == p.shape:
                        assert (value[~sp.masks[name]] == 0).all(), (name, sp.step)
    assert pruned_ever


def test_magnitude_prunes_once_at_start_step_and_then_holds():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparse_train.attach(model, opt, method="magnitude", target=0.75, start_step=3)
    seen = []
    for x, y in batches(8):
        seen.append((sp.step, set(densities(sp).values()), sp.fixed_masks() is None))
        train_step(model, opt, x, y)
    assert seen[:3] == [(t, {1.0}, True) for t in range(3)]
    assert all(d == {0.25} and not unfixed for _, d, unfixed in seen[3:])


def test_gmp_density_follows_the_cubic_schedule():
    o = dict(target=0.8, initial_sparsity=0.2, start_step=2, end_step=14, frequency=4)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_train.attach(model, opt, method="gmp", **o)
    last_update = None
    for x, y in batches(18):
        if o["start_step"] <= sp.step <= o["end_step"] and (sp.step - 2) % 4 == 0:
            last_update = sp.step
        if last_update is None:
            expected = 0.0
        else:
            expected = cubic_sparsity(last_update, o["start_step"], o["end_step"],
                                      o["initial_sparsity"], o["target"])
        for name, mask in sp.masks.items():
            assert (~mask).sum().item() == round(expected * mask.numel()), (name, sp.step)
        assert (sp.fixed_masks() is not None) == (sp.step >= o["end_step"])
        train_step(model, opt, x, y)


def test_global_scope_sparsifies_layers_unevenly_but_hits_the_target_overall():
    model = mlp()
    with torch.no_grad():
        model[4].weight.mul_(10)  # a layer of large weights should keep more
    sp = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             method="magnitude", target=0.6, scope="global")
    report = sp.report()
    assert report["density"] == pytest.approx(0.4, abs=1 / 344)  # 344 weights
    assert report["layers"]["4.weight"]["density"] > 0.9


def _dns_setup(**extra):
    """One Linear layer under DNS with plain SGD, lr 1, so a step moves W by -grad."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 8, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    sp = sparse_train.attach(layer, opt, method="dns", **{"dns_gamma": 0.0, **extra})
    return layer, opt, sp


def test_dns_first_masks_prune_below_0_9_t():
    layer, _, sp = _dns_setup(dns_c=0.5)
    dense = sp._dense["weight"]
    magnitude = dense.abs()
    t = (magnitude.mean() + 0.5 * magnitude.std(unbiased=False)).item()
    assert sp.method.thresholds["weight"] == pytest.approx(t)
    assert sp.masks["weight"].equal(magnitude >= 0.9 * t)
    assert layer.weight.detach().equal(dense * sp.masks["weight"])


def test_dns_pruned_weights_keep_training_and_splice_back_above_1_1_t():
    layer, opt, sp = _dns_setup(dns_c=0.5)
    t = sp.method.thresholds["weight"]
    mask, dense = sp.masks["weight"].clone(), sp._dense["weight"].clone()
    pruned = (~mask).nonzero()[0].tolist()
    kept = mask.nonzero()[0].tolist()
    # Straight-through: a gradient at a pruned position still moves its dense weight.
    grad = torch.zeros_like(dense)
    grad[tuple(pruned)] = dense[tuple(pruned)] - 0.1 * t * torch.sign(dense[tuple(pruned)])
    grad[tuple(kept)] = dense[tuple(kept)] - 0.95 * t  # into the hysteresis band: kept
    layer.weight.grad = grad
    opt.step()
    assert sp._dense["weight"][tuple(pruned)].abs().item() == pytest.approx(0.1 * t, rel=1e-5)
    assert sp.masks["weight"][tuple(kept)] and not sp.masks["weight"][tuple(pruned)]
    assert layer.weight[tuple(pruned)].item() == 0.0
    # Now push the pruned weight above 1.1 t and the kept one below 0.9 t.
    grad = torch.zeros_like(dense)
    grad[tuple(pruned)] = -1.2 * t * torch.sign(dense[tuple(pruned)])
    grad[tuple(kept)] = 0.1 * t
    layer.weight.grad = grad
    opt.step()
    assert sp.masks["weight"][tuple(pruned)], "pruned weight was not spliced back"
    assert not sp.masks["weight"][tuple(kept)], "weight in (0, 0.9t) was not pruned"
    assert layer.weight[tuple(pruned)].abs().item() == pytest.approx(1.3 * t, rel=1e-5)


def test_dns_trains_dense_until_start_step_then_takes_thresholds_from_those_weights():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparse_train.attach(model, opt, method="dns", dns_c=0.5, dns_start_step=5)
    for x, y in batches(5):
        assert sp.grad_mask_policy == "drop" and sp.fixed_masks() is None
        assert all(mask.all() for mask in sp.masks.values()) and not sp.method.thresholds
        train_step(model, opt, x, y)
    assert sp.grad_mask_policy == "keep"
    for name, dense in sp._dense.items():  # the weights after 5 dense steps
        assert sp.method.thresholds[name] == pytest.approx(dns_threshold(dense, 0.5))
        assert not sp.masks[name].all()


def test_dns_c_per_layer_pattern_first_match_wins():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparse_train.attach(model, opt, method="dns", layers=["4.weight", "*.weight"],
                             dns_c=[-10.0, 0.5])
    assert sp.method.thresholds["4.weight"] == 0.0 and sp.masks["4.weight"].all()
    for name in ("0.weight", "2.weight"):
        assert sp.method.thresholds[name] == pytest.approx(
            dns_threshold(sp._dense[name], 0.5))


def test_dns_revises_masks_with_decaying_probability_from_private_draws():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparse_train.attach(model, opt, method="dns", dns_gamma=0.5, dns_iter_stop=20,
                             dns_seed=3)
    data = batches(24)
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    assert sp.grad_mask_policy == "keep" and sp.fixed_masks() is None
    for x, y in data:
        train_step(model, opt, x, y)
    assert torch.get_rng_state().equal(rng_before)
    assert sp.grad_mask_policy == "drop" and sp.fixed_masks() is not None
    assert not sp._dense  # hard masks from iter_stop on


def test_dns_pruning_leaves_the_dense_weights_momentum_alone():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_train.attach(model, opt, method="dns", **SCHEDULES["dns"])
    events = 0
    for x, y in batches(12):
        before = {name: mask.clone() for name, mask in sp.masks.items()}
        train_step(model, opt, x, y)
        for name, p in sp.params.items():
            newly_pruned = before[name] & ~sp.masks[name]
            events += int(newly_pruned.sum())
            assert (opt.state[p]["momentum_buffer"][newly_pruned] != 0).all()
    assert events > 0


def test_iht_alternates_dense_and_sparse_phases_and_ends_sparse():
    o = SCHEDULES["iht"]  # 3 dense, 4 sparse, twice, then sparse
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_train.attach(model, opt, method="iht", **o)
    phases, last_mask = [], None
    for x, y in batches(20):
        dense = all(d == 1.0 for d in densities(sp).values())
        assert dense or all(d == 0.5 for d in densities(sp).values())
        assert (sp.fixed_masks() is None) == dense
        phases.append("D" if dense else "S")
        if sp.step == 10:
            last_mask = {n: m.clone() for n, m in sp.masks.items()}
        train_step(model, opt, x, y)
    assert "".join(phases) == "DDDSSSSDDDSSSSSSSSSS"
    assert all(sp.masks[n].equal(m) for n, m in last_mask.items())


def test_iht_ends_dense_when_asked():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparse_train.attach(model, opt, method="iht",
                             **{**SCHEDULES["iht"], "iht_end": "dense"})
    for x, y in batches(16):
        train_step(model, opt, x, y)
    assert all(m.all() for m in sp.masks.values()) and sp.fixed_masks() is None


def test_dsd_final_dense_phase_restarts_pruned_weights_from_zero():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_train.attach(model, opt, method="dsd", dsd_dense_steps=4,
                             dsd_sparse_steps=3, target=0.5)
    data = batches(9)
    for x, y in data[:7]:
        train_step(model, opt, x, y)
    assert sp.step == 7 and all(m.all() for m in sp.masks.values())
    w = model[0].weight
    was_pruned = w.detach() == 0
    assert was_pruned.float().mean().item() == pytest.approx(0.5)
    assert (opt.state[w]["momentum_buffer"][was_pruned] == 0).all()
    # One step from zero with zero momentum: w = 0 - lr * grad at the revived positions.
    x, y = data[7]
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grad = w.grad[was_pruned].clone()
    opt.step()
    assert torch.allclose(w.detach()[was_pruned], -0.1 * grad)
    assert (w.detach()[was_pruned] != 0).any()


def test_nm_is_dense_until_start_then_fixed_n_m():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_train.attach(model, opt, method="nm", n=1, m=4, nm_start_step=3)
    for x, y in batches(8):
        before = sp.step < 3
        assert all(m.all() for m in sp.masks.values()) == before
        assert (sp.fixed_masks() is None) == before
        train_step(model, opt, x, y)
    report = sp.report()
    assert all(layer["nm_compliant"] for layer in report["layers"].values())
    assert all(layer["density"] == 0.25 for layer in report["layers"].values())


def test_nm_leaves_layers_with_bad_input_dim_dense_and_reports_them():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 4 * 4, 6), torch.nn.Linear(6, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sp = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), method="nm")
    assert set(sp.skipped) == {"0.weight", "3.weight"}
    assert "not a multiple of m = 4" in sp.report()["skipped"]["3.weight"]
    assert model[0].weight.equal(before["0.weight"]) and model[3].weight.equal(before["3.weight"])
    assert sp.report()["layers"]["2.weight"]["nm_compliant"]


def test_block_gradual_prunes_whole_blocks():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_train.attach(model, opt, method="block", **SCHEDULES["block"])
    for x, y in batches(14):
        train_step(model, opt, x, y)
    assert "4.weight" in sp.skipped
    for name, mask in sp.masks.items():
        tiles = mask.reshape(mask.shape[0] // 2, 2, -1, 4)
        assert (tiles.all(3).all(1) | ~tiles.any(3).any(1)).all()
        assert mask.float().mean().item() == pytest.approx(0.5)
    assert sp.fixed_masks() is not None


@pytest.mark.parametrize("method", METHODS)
def test_sparse_training_still_learns_the_synthetic_task(method):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sp = sparse_train.attach(model, opt, method=method, **SCHEDULES[method])
    for x, y in batches(100):
        train_step(model, opt, x, y)
    x, y = batches(1, seed=7, size=1024)[0]
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    # Chance is 1/3; the dense model reaches about 0.88 in the same 100 steps.
    assert accuracy > 0.6, (method, accuracy, sp.report()["density"])


def test_dns_statistics_skip_exact_zeros_as_the_authors_code_does():
    """A 400k layer, half of it exact zeros: mu and sigma over the nonzero half (Caffe's
    rule) give a higher threshold than over all entries."""
    w = torch.randn(400_000, generator=torch.Generator().manual_seed(0)) * 0.05
    w[::2] = 0
    nonzero = w[w != 0].abs().double()
    expected = float(nonzero.mean() + 1.0 * nonzero.std(unbiased=False))
    assert dns_threshold(w, 1.0) == pytest.approx(expected, rel=1e-12)
    everything = w.abs().double()
    assert dns_threshold(w, 1.0, nonzero_only=False) == pytest.approx(
        float(everything.mean() + everything.std(unbiased=False)), rel=1e-12)
    assert dns_threshold(w, 1.0) > 1.2 * dns_threshold(w, 1.0, nonzero_only=False)


def test_dns_draws_depend_on_layer_name_and_step_not_on_the_order_layers_are_asked():
    """A layer's revision at a step must not depend on which layers were drawn for before
    it (a stream shared across layers would), so masks do not move when layers are
    listed in another order, e.g. after a restart."""
    from sparse_train.methods.dns import DNS
    from sparse_train.options import SparsityOptions
    weights = {n: torch.randn(40, 30, generator=torch.Generator().manual_seed(i))
               for i, n in enumerate(["a.weight", "b.weight", "c.weight"])}
    runs = []
    for order in (["a.weight", "b.weight", "c.weight"], ["c.weight", "a.weight", "b.weight"]):
        method = DNS(SparsityOptions(method="dns", dns_gamma=0.5, dns_power=1.0))
        masks = {n: torch.ones_like(weights[n], dtype=torch.bool) for n in order}
        revised = []
        for step in range(12):
            new = method.update(step, {n: weights[n] for n in order}, masks) or {}
            revised.append(sorted(new))
        runs.append(revised)
    assert runs[0] == runs[1]
    assert any(0 < len(r) < 3 for r in runs[0])  # some steps revise some layers only
