"""select_topk returns exactly k distinct entries, the true top-k whenever enough pass its
threshold, on both the CPU (dynamic shape) and CUDA (static shape) code paths."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dgc.select as select
from dgc.select import ThresholdState, select_topk, uses_exact_topk

ROOT = Path(__file__).resolve().parents[1]
# Sizes below EXACT_BELOW_NUMEL take the plain torch.topk path; the others the sampled one,
# with and without a partial last row.
PIPELINE_SIZES = [300_000, 1_000_003]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=[False, True], ids=["cpu-path", "cuda-path"])
def code_path(request, monkeypatch):
    """Run each test on the CPU code path and on the one CUDA takes (static shapes)."""
    monkeypatch.setattr(select, "_FORCE_CUDA_PATH", request.param)
    return request.param


def assert_valid(x: torch.Tensor, k: int, indices: torch.Tensor, values: torch.Tensor) -> None:
    assert indices.dtype == torch.int64 and indices.shape == (k,)
    assert values.dtype == x.dtype and values.shape == (k,)
    assert indices.unique().numel() == k, "indices are not distinct"
    assert int(indices.min()) >= 0 and int(indices.max()) < x.numel()
    assert torch.equal(values, x[indices])


def assert_top_k(x: torch.Tensor, k: int, indices: torch.Tensor) -> None:
    """The selected magnitudes are the k largest (a multiset check, so ties may differ)."""
    picked = x[indices].abs().float().sort(descending=True).values
    best = x.abs().float().topk(k).values
    assert torch.equal(picked, best)


def normal(numel: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.001, 0.01, 0.04])
@pytest.mark.parametrize("numel", PIPELINE_SIZES)
def test_sampled_path_equals_torch_topk(code_path, numel, density, dtype):
    x = normal(numel, dtype)
    k = round(density * numel)
    assert not uses_exact_topk(numel, k)
    indices, values = select_topk(x, k)
    assert_valid(x, k, indices, values)
    assert_top_k(x, k, indices)
    if dtype == torch.float32:  # no ties among 1M normal fp32 draws: the sets are equal
        assert set(indices.tolist()) == set(torch.topk(x.abs(), k).indices.tolist())


@pytest.mark.parametrize("numel,k", [(1000, 1), (1000, 1000), (50_000, 37), (300_000, 0.2)])
def test_exact_path_small_or_dense(numel, k):
    k = k if isinstance(k, int) else round(k * numel)
    x = normal(numel)
    assert uses_exact_topk(numel, k)
    indices, values = select_topk(x, k)
    assert_valid(x, k, indices, values)
    assert_top_k(x, k, indices)


@pytest.mark.parametrize("numel", [1, 7, 1_000_003])
def test_k_equals_numel_and_k_one(numel):
    x = normal(numel)
    indices, values = select_topk(x, numel)
    assert_valid(x, numel, indices, values)
    indices, values = select_topk(x, 1)
    assert_valid(x, 1, indices, values)
    assert int(indices) == int(x.abs().argmax())


def test_mostly_zeros_returns_all_nonzeros_and_distinct_zeros(code_path):
    x = torch.zeros(1_000_003)
    nonzero = torch.tensor([5, 64, 999, 500_000, 1_000_002])
    x[nonzero] = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0])
    k = 1000  # far more than the five nonzeros: the rest must be distinct real zeros
    indices, values = select_topk(x, k)
    assert_valid(x, k, indices, values)
    assert set(nonzero.tolist()) <= set(indices.tolist())
    assert int((values != 0).sum()) == 5


def test_all_ties_returns_k_distinct(code_path):
    x = torch.full((400_000,), -0.5, dtype=torch.float16)
    indices, values = select_topk(x, 4000)
    assert_valid(x, 4000, indices, values)


def test_threshold_too_high_fills_with_real_entries(code_path):
    """A state that pushes the threshold to the top of the sample leaves fewer than k
    candidates: those are the largest entries, and the rest are still distinct and real."""
    x, k = normal(1_000_003), 1000
    state = ThresholdState()
    state.rank_shift = torch.tensor(-select.MAX_RANK_DOUBLINGS)
    indices, values = select_topk(x, k, state=state)
    assert_valid(x, k, indices, values)
    passed = int(state.last_candidates)
    assert 0 < passed < k
    top = torch.topk(x.abs(), passed).indices
    assert set(top.tolist()) <= set(indices.tolist())


def test_threshold_too_low_overflows_to_k_real_entries(code_path):
    x, k = normal(1_000_003), 1000
    state = ThresholdState()
    state.rank_shift = torch.tensor(select.MAX_RANK_DOUBLINGS)
    indices, values = select_topk(x, k, state=state)
    assert_valid(x, k, indices, values)


def test_state_corrects_a_biased_sample():
    """Rows the sample reads are 10% larger, so the first threshold overshoots; the
    state brings the candidate count up to its target within a few calls."""
    numel, k = 1_000_003, 1000
    plan = select._plan(numel, k, 0.01)
    x = normal(numel)
    sampled_rows = torch.arange(0, plan.sample_rows * plan.row_stride, plan.row_stride)
    x[: plan.rows * select.GROUP].view(plan.rows, -1)[sampled_rows] *= 1.1
    state = ThresholdState()
    counts = []
    for _ in range(8):
        indices, values = select_topk(x, k, state=state)
        assert_valid(x, k, indices, values)
        counts.append(int(state.last_candidates))
    assert counts[0] < k
    assert k <= counts[-1] <= 2 * plan.target
    assert_top_k(x, k, indices)


def test_a_draw_picks_the_sample_deterministically_and_exactly():
    x, k = normal(1_000_003), 1000
    first = select_topk(x, k, draw=12345)[0]
    assert_top_k(x, k, first)
    again = select_topk(x, k, draw=12345)[0]
    assert torch.equal(first.sort().values, again.sort().values)


@pytest.mark.parametrize("numel,k", [(1 << 17, 2048), (1 << 18, 13)])
def test_a_full_sample_gives_exactly_the_top_k_set_call_after_call(numel, k):
    """sample_ratio 1.0 (and any sample of every row) reads the exact threshold; the
    calibration state must not shift it off into an overflowing candidate buffer."""
    state = ThresholdState()
    for call in range(40):
        x = normal(numel, seed=call)
        indices, values = select_topk(x, k, 1.0, state=state, draw=call)
        assert_valid(x, k, indices, values)
        assert_top_k(x, k, indices)


def test_state_round_trip():
    x, k = normal(1_000_003), 1000
    state = ThresholdState(gain=0.25)
    for _ in range(3):
        select_topk(x, k, state=state)
    restored = ThresholdState()
    restored.load_state_dict(state.state_dict())
    assert restored.gain == 0.25
    assert torch.equal(restored.rank_shift, state.rank_shift)
    a = select_topk(x * 1.5, k, state=state)[0]
    b = select_topk(x * 1.5, k, state=restored)[0]
    assert torch.equal(a.sort().values, b.sort().values)
    assert torch.equal(restored.rank_shift, state.rank_shift)


@pytest.mark.parametrize("numel", [20, 32 * select.PREPARED_CHUNK_ROWS * 2 + 77, 1_000_003])
def test_row_peaks_prepares_every_entry_once_before_reducing_it(code_path, numel):
    """``prepare`` covers x exactly once, in order, and the peaks are those of x as prepared;
    select_topk given them picks what it picks without them."""
    raw = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    x = torch.zeros(numel)
    touched = torch.zeros(numel, dtype=torch.int64)
    ends = []

    def prepare(part):
        assert part.start == (ends[-1] if ends else 0)
        ends.append(part.stop)
        touched[part] += 1
        x[part] = raw[part] * 3

    peaks = select.row_peaks(x, prepare)
    assert ends[-1] == numel and bool((touched == 1).all())
    rows = numel // select.GROUP
    expected = x[: rows * select.GROUP].view(rows, select.GROUP).abs().amax(1)
    assert torch.equal(peaks, expected) and torch.equal(select.row_peaks(x), expected)
    k = max(1, numel // 1000)
    if not uses_exact_topk(numel, k):
        assert torch.equal(select_topk(x, k, peaks=peaks)[0], select_topk(x, k)[0])


@pytest.mark.parametrize("count", [1, 40, 300, 1000])
def test_largest_of_sample_equals_topk(count):
    """The threshold ranks only the sample rows with the largest maxima; that must find the
    same values as ranking the whole sample, ties included."""
    sample = normal(500 * select.GROUP).abs().view(500, select.GROUP)
    sample[7] = sample[3]  # duplicate rows: equal maxima
    found = select._largest(sample, count).sort().values
    assert torch.equal(found, sample.view(-1).topk(count).values.sort().values)


def test_cuda_path_matches_cpu_path(monkeypatch):
    x, k = normal(1_000_003, seed=3), 2000
    dynamic = select_topk(x, k)[0].sort().values
    monkeypatch.setattr(select, "_FORCE_CUDA_PATH", True)
    assert torch.equal(select_topk(x, k)[0].sort().values, dynamic)


@pytest.mark.parametrize("bad", [
    dict(x=torch.zeros(4, 4), k=1),
    dict(x=torch.zeros(8, dtype=torch.int32), k=1),
    dict(x=torch.zeros(8), k=0),
    dict(x=torch.zeros(8), k=9),
    dict(x=torch.zeros(8), k=1, sample_ratio=0.0),
])
def test_bad_arguments_name_the_argument(bad):
    with pytest.raises(ValueError, match="select_topk"):
        select_topk(**bad)


def test_benchmark_quick_runs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_select.py"),
                          "--quick"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "| numel | density |" in out.stdout
    assert "select_topk" in out.stdout
