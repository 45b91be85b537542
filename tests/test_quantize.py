"""Trained weight sharing (sparse_train.quantize): k-means, tied training, state, DDP."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparse_comm.schema import ConfigError
from sparse_train.quantize import init_centroids, kmeans_1d, share_weights
from tests.distributed import run_ranks


def pruned_model(seed: int = 0, keep: float = 0.4) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    masks = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                threshold = p.abs().flatten().kthvalue(int((1 - keep) * p.numel())).values
                masks[name] = p.abs() > threshold
                p.mul_(masks[name])
    return model, masks


def test_kmeans_assigns_every_value_to_its_nearest_centroid_and_centroids_are_means():
    values = torch.randn(2000, dtype=torch.float64) ** 3
    centroids, clusters = kmeans_1d(values, init_centroids(values, 16, "linear", None))
    distance = (values[:, None] - centroids[None, :]).abs()
    assert torch.allclose(distance.gather(1, clusters[:, None]).squeeze(1), distance.min(1).values)
    for k in clusters.unique():
        assert centroids[k] == pytest.approx(values[clusters == k].mean().item())


def test_initialisations_follow_the_paper():
    values = torch.randn(1001, dtype=torch.float64)
    linear = init_centroids(values, 8, "linear", None)
    assert linear[0] == values.min() and linear[-1] == values.max()
    assert torch.allclose(linear.diff(), linear.diff()[0].expand(7))
    density = init_centroids(values, 4, "density", None)  # CDF levels 1/8, 3/8, 5/8, 7/8
    ordered = values.sort().values
    assert density.tolist() == [ordered[int(q * 1001)].item() for q in (0.125, 0.375, 0.625, 0.875)]
    pick = init_centroids(values, 8, "random", torch.Generator().manual_seed(3))
    assert all(v in values for v in pick)
    again = init_centroids(values, 8, "random", torch.Generator().manual_seed(3))
    assert torch.equal(pick, again)


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_shared_weights_take_codebook_values_and_pruned_ones_stay_zero(init):
    model, masks = pruned_model()
    sharing = share_weights(model, bits=3, per_layer_bits={"0.*": 2}, init=init, masks=masks)
    assert sharing.bits == {"0.weight": 2, "3.weight": 3}
    for name, p in model.named_parameters():
        if name in masks:
            assert set(p[masks[name]].tolist()) <= set(sharing.codebooks[name].tolist())
            assert len(sharing.codebooks[name]) == 2 ** sharing.bits[name]
            assert (p[~masks[name]] == 0).all()
            assert torch.equal(sharing.masks[name], masks[name])


def test_centroids_move_by_the_summed_gradient_of_their_weights():
    model, masks = pruned_model()
    sharing = share_weights(model, bits=3, masks=masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sharing.attach(optimizer)
    before = {n: c.clone() for n, c in sharing.codebooks.items()}
    nn.functional.cross_entropy(model(torch.randn(16, 1, 8, 8)),
                                torch.randint(0, 10, (16,))).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name, assignment in sharing.assignments.items():
        live = assignment >= 0
        summed = torch.zeros(8).index_add_(0, assignment[live].long(), grads[name][live])
        torch.testing.assert_close(sharing.codebooks[name], before[name] - 0.05 * summed)


def test_tied_weights_train_like_the_codebook_under_momentum_and_weight_decay():
    model, masks = pruned_model()
    sharing = share_weights(model, bits=4, masks=masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    # Reference: the codebooks themselves as parameters, trained with the paper's gradient.
    codebooks = {n: nn.Parameter(c.clone()) for n, c in sharing.codebooks.items()}
    reference = torch.optim.SGD(codebooks.values(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    with torch.no_grad():  # momentum from training would untie the clusters: attach drops it
        for p in model.parameters():
            optimizer.state[p]["momentum_buffer"] = torch.randn_like(p)
    sharing.attach(optimizer)
    assignments = sharing.assignments
    for step in range(5):
        torch.manual_seed(step)
        loss = nn.functional.cross_entropy(model(torch.randn(16, 1, 8, 8)),
                                           torch.randint(0, 10, (16,)))
        optimizer.zero_grad()
        loss.backward()
        for name, c in codebooks.items():
            live = assignments[name] >= 0
            c.grad = torch.zeros_like(c).index_add_(
                0, assignments[name][live].long(), model.get_parameter(name).grad[live])
        optimizer.step()
        reference.step()
        for name, c in codebooks.items():
            # Centroids that hold no weight (linear init puts some in the pruned range) get
            # no gradient and stay put; the reference would decay them.
            used = torch.bincount(assignments[name][masks[name]].long(), minlength=16) > 0
            torch.testing.assert_close(sharing.codebooks[name][used], c.detach()[used],
                                       rtol=1e-5, atol=1e-7)
            weight = model.get_parameter(name)
            assert (weight[~masks[name]] == 0).all() and (weight.grad[~masks[name]] == 0).all()
            assert len(weight[masks[name]].unique()) <= 16


def test_state_dict_round_trip_restores_codebooks_and_weights():
    model, masks = pruned_model()
    sharing = share_weights(model, bits=3, masks=masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sharing.attach(optimizer)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    optimizer.step()
    state = sharing.state_dict()
    fresh, fresh_masks = pruned_model(seed=1, keep=0.9)
    restored = share_weights(fresh, bits=2, masks=fresh_masks)
    restored.load_state_dict(state)
    for name in masks:
        assert torch.equal(restored.codebooks[name], sharing.codebooks[name])
        assert torch.equal(restored.assignments[name], sharing.assignments[name])
        assert torch.equal(fresh.get_parameter(name), model.get_parameter(name))
    assert restored.bits == sharing.bits


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 0}, "config key 'bits': must be an int in [1, 16], got 0"),
    ({"bits": 17}, "config key 'bits': must be an int in [1, 16], got 17"),
    ({"per_layer_bits": {"0.weight": 20}}, "config key 'per_layer_bits.0.weight': must be"),
    ({"per_layer_bits": {"nothing*": 2}}, "config key 'per_layer_bits.nothing*': matches no"),
    ({"init": "kmeans++"}, "config key 'init': must be one of linear, density, random"),
    ({"per_layer_bits": {"0.weight": 6}},
     "config key 'per_layer_bits.0.weight': 0.weight has 58 live weights, fewer than the "
     "64 centroids of a 6-bit codebook"),
])
def test_bad_input_is_a_config_error_naming_the_key(kwargs, message):
    model, masks = pruned_model()
    with pytest.raises(ConfigError) as err:
        share_weights(model, **{"bits": 2, "masks": masks, **kwargs})
    assert message in str(err.value)


def test_a_mask_that_does_not_fit_its_parameter_is_a_config_error_naming_it():
    model, masks = pruned_model()
    masks["0.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ConfigError, match=r"config key 'masks.0.weight': shape \(3, 3\)"):
        share_weights(model, bits=2, masks=masks)


def _ddp_fine_tune(rank, world_size):
    model, masks = pruned_model(seed=0)
    ddp = nn.parallel.DistributedDataParallel(model)
    sharing = share_weights(ddp, bits=4, masks=masks, init="random")
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    sharing.attach(optimizer)
    torch.manual_seed(100 + rank)  # each rank its own data
    for _ in range(3):
        loss = nn.functional.cross_entropy(ddp(torch.randn(8, 1, 8, 8)),
                                           torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Plain lists: tensors sent through the result queue need the sender alive to unpickle.
    layers = {name: {key: value.tolist() for key, value in layer.items() if key != "bits"}
              for name, layer in sharing.state_dict()["layers"].items()}
    return layers, {n: p.detach().tolist() for n, p in model.named_parameters()}


def test_ranks_hold_identical_codebooks_and_weights_under_ddp():
    (layers0, weights0), (layers1, weights1) = run_ranks(_ddp_fine_tune, 2)
    assert layers0 == layers1 and weights0 == weights1  # bit for bit
    for name, layer in layers0.items():
        codebook, assignment = torch.tensor(layer["codebook"]), torch.tensor(layer["assignment"])
        live = assignment >= 0
        assert torch.equal(torch.tensor(weights0[name])[live], codebook[assignment[live].long()])
