"""Pure mask rules and schedules: no model, no optimizer, no processes."""
import pytest
import torch

from sparse_train import masks
from sparse_train.methods import cubic_sparsity, iht_phase
from sparse_train.methods.dns import dns_threshold, surgery, update_probability


def groups_along_input(weight, m):
    """Groups of m consecutive input weights, built independently of masks.nm_matrix."""
    if weight.dim() == 2:
        return weight.reshape(weight.shape[0], -1, m)
    k, c = weight.shape[:2]
    per_position = weight.permute(0, 2, 3, 1)  # [K, R, S, C]: channels innermost
    return per_position.reshape(k, -1, c // m, m)


def test_magnitude_per_layer_prunes_the_smallest_of_each_layer():
    w = {"a": torch.tensor([[0.1, -3.0], [2.0, -0.2]]), "b": torch.tensor([[10.0, 20.0]])}
    out = masks.magnitude_masks(w, 0.5, "layer")
    assert out["a"].tolist() == [[False, True], [True, False]]
    assert out["b"].tolist() == [[False, True]]


def test_magnitude_global_uses_one_threshold_across_layers():
    w = {"a": torch.tensor([[0.1, -3.0], [2.0, -0.2]]), "b": torch.tensor([[10.0, 20.0]])}
    out = masks.magnitude_masks(w, 0.5, "global")
    assert out["b"].all() and out["a"].tolist() == [[False, True], [False, False]]


def test_magnitude_prunes_an_exact_count_with_ties():
    w = {"a": torch.ones(10, 10)}
    assert int(masks.magnitude_masks(w, 0.29)["a"].sum()) == 71


def test_nm_mask_linear_keeps_n_largest_in_each_group_along_rows():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    mask = masks.nm_mask(w, 2, 4)
    groups = groups_along_input(mask, 4)
    assert (groups.sum(-1) == 2).all()
    kept_min = (w.abs() * mask).reshape(6, 4, 4).masked_fill(~groups, float("inf")).amin(-1)
    dropped_max = (w.abs() * ~mask).reshape(6, 4, 4).amax(-1)
    assert (kept_min >= dropped_max).all()
    assert masks.nm_compliant(w * mask, 2, 4)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 8), (1, 2)])
def test_nm_mask_conv_groups_input_channels_at_each_kernel_position(n, m):
    torch.manual_seed(1)
    w = torch.randn(5, 2 * m, 3, 3)
    mask = masks.nm_mask(w, n, m)
    assert (groups_along_input(mask, m).sum(-1) == n).all()
    assert masks.nm_compliant(w * mask, n, m)
    assert masks.nm_unmatrix(masks.nm_matrix(w), w.shape).equal(w)


def test_nm_compliance_is_judged_along_channels_not_flattened_kernel():
    # Two nonzeros per group of 4 consecutive entries of reshape(K, -1) but 4 nonzeros in
    # one group of 4 channels at kernel position (0, 0): not N:M by NVIDIA's convention.
    w = torch.zeros(1, 4, 2, 2)
    w[0, :, 0, 0] = 1.0
    assert (w.reshape(1, -1, 4) != 0).sum(-1).max() <= 2
    assert not masks.nm_compliant(w, 2, 4)


def test_nm_skips_layers_whose_input_dimension_is_not_a_multiple_of_m():
    assert masks.nm_skip_reason((8, 6), 4) is not None
    assert masks.nm_skip_reason((8, 1, 5, 5), 4) is not None  # MNIST's first conv
    assert masks.nm_skip_reason((8, 12), 4) is None
    assert masks.nm_skip_reason((8, 4, 5, 5), 4) is None
    assert not masks.nm_compliant(torch.zeros(8, 6), 2, 4)


def test_block_masks_prune_whole_blocks_by_norm():
    w = torch.ones(4, 6)
    w[0:2, 0:3] = 5.0
    w[2:4, 3:6] = 0.1
    l2 = masks.block_masks({"w": w}, 0.5, (2, 3), "l2")["w"]
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[0:2, 0:3] = True
    expected[0:2, 3:6] = True  # norm sqrt(6) ties with the block at [2:4, 0:3]; first wins
    assert l2.equal(expected)
    assert masks.block_scores(w, (2, 3), "l1")[0, 0] == 30.0


def test_block_masks_on_conv_use_out_by_flattened_input_matrix():
    torch.manual_seed(2)
    w = torch.randn(4, 2, 2, 2)
    mask = masks.block_masks({"w": w}, 0.5, (2, 4))["w"]
    tiles = mask.reshape(2, 2, 2, 4)
    per_block = tiles.all(dim=3).all(dim=1) | ~tiles.any(dim=3).any(dim=1)
    assert per_block.all() and int(mask.sum()) == 16  # 2 of 4 blocks of 8
    assert masks.block_skip_reason((4, 6), (4, 4)) is not None


def test_block_masks_global_scope_spans_layers():
    w = {"a": torch.full((2, 4), 1.0), "b": torch.full((2, 4), 3.0)}
    out = masks.block_masks(w, 0.5, (2, 2), scope="global")
    # both of a's blocks score below b's; a keeps one only because no layer goes empty
    assert int(out["a"].sum()) == 4 and out["b"].all()


def test_cubic_schedule_at_start_end_and_midpoint():
    kw = dict(start=100, end=300, initial=0.1, final=0.9)
    assert cubic_sparsity(100, **kw) == pytest.approx(0.1)
    assert cubic_sparsity(300, **kw) == pytest.approx(0.9)
    assert cubic_sparsity(200, **kw) == pytest.approx(0.9 + (0.1 - 0.9) / 8)
    assert cubic_sparsity(50, **kw) == pytest.approx(0.1)
    assert cubic_sparsity(10_000, **kw) == pytest.approx(0.9)


def test_iht_phases_alternate_and_end_as_configured():
    phases = [iht_phase(t, 2, 3, 2, "dense") for t in range(12)]
    assert [p for p, _ in phases] == ["dense"] * 2 + ["sparse"] * 3 + ["dense"] * 2 + \
        ["sparse"] * 3 + ["dense"] * 2
    assert [b for _, b in phases][:10] == [0, 0, 2, 2, 2, 5, 5, 7, 7, 7]
    assert iht_phase(50, 2, 3, 2, "sparse") == ("sparse", 7)


def test_dns_threshold_is_mean_plus_c_std_of_magnitudes():
    w = torch.tensor([1.0, -1.0, 3.0, -3.0])
    assert dns_threshold(w, 0.0) == pytest.approx(2.0)
    assert dns_threshold(w, 0.5) == pytest.approx(2.5)
    assert dns_threshold(w, -10.0) == 0.0


def test_dns_surgery_prunes_below_0_9_t_splices_above_1_1_t():
    t = 1.0
    w = torch.tensor([0.85, 0.95, 1.05, 1.15, 0.85, 0.95, 1.05, 1.15])
    mask = torch.tensor([True] * 4 + [False] * 4)
    new = surgery(w, mask, t)
    assert new.tolist() == [False, True, True, True, False, False, False, True]


def test_dns_update_probability_decays():
    assert update_probability(0, 1e-4, 1.0) == 1.0
    assert update_probability(10_000, 1e-4, 1.0) == pytest.approx(0.5)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_no_layer_is_pruned_away_entirely(scope):
    """round(sparsity * count) would remove all 20 weights at 0.98 and all 16 blocks at
    0.97; the rules keep each layer's largest weight (block) instead."""
    small, big = torch.randn(4, 5), torch.randn(200, 300) * 10
    kept = masks.magnitude_masks({"small": small, "big": big}, 0.98, scope)
    assert int(kept["small"].sum()) >= 1
    assert kept["small"].view(-1)[small.abs().argmax()]
    blocks = masks.block_masks({"w": torch.randn(16, 16)}, 0.97, (4, 4), scope=scope)["w"]
    assert int(blocks.sum()) == 16  # one 4x4 block left
    assert int(masks.magnitude_masks({"w": torch.randn(4, 5)}, 0.98, scope)["w"].sum()) == 1


def test_the_sparsifier_report_says_when_a_layer_sits_at_the_floor():
    import sparse_train
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 300))
    sp = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             method="magnitude", target=0.98)
    report = sp.report()
    assert report["layers"]["0.weight"]["at_floor"]  # 20 weights, 0.98: one kept
    assert not report["layers"]["1.weight"]["at_floor"]
    assert "at least one weight" in report["floor"]
