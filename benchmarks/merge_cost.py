"""What one merge of two sets of pairs costs on the host: gtopk's round (``_merge_pair`` and
knowing which of this rank's own pairs are still in) and the sparse intra-node stage's node
merge of two ranks' sets (``merge_slots`` in index order, and which own pairs it holds).

    python benchmarks/merge_cost.py                        # the wide MLP's three slots
    python benchmarks/merge_cost.py --repo /path/to/older/checkout   # the same, older code
    python benchmarks/merge_cost.py --quick                # small slots (CI)

The sets are those of the 20.0M-parameter wide MLP at density 0.001 (k = 16,777, 3,212 and
41 pairs per rank), drawn at random with a third of each big slot's indices shared between
the two sets. One thread, as each of the link benchmark's ranks runs; medians of
``--repeats``. ``--repo`` imports ``dgc`` from another checkout, so two versions are timed
with the same script and sets; ``--check FILE`` saves the results (or compares them with a
file saved by the other version), to show the two give the same bits.
"""
from __future__ import annotations

import inspect
import os
import pickle
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.checkout import checkout, use_checkout  # noqa: E402
from launch.cli import OneLineParser, integer, output_file  # noqa: E402

WIDE_MLP = ((4096 * 4096, 16777), (784 * 4096, 3212), (4096 * 10, 41))
QUICK = ((20000, 200), (5000, 50), (100, 1))


def main(argv=None) -> int:
    p = OneLineParser(prog="merge_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=checkout, default=REPO)
    p.add_argument("--repeats", type=integer(1), default=40)
    p.add_argument("--quick", action="store_true", help="small slots, 3 repeats")
    p.add_argument("--check", type=output_file,
                   help="save the merged sets here, or compare with a saved file")
    args = p.parse_args(argv)
    import torch

    saved = None
    if args.check and os.path.exists(args.check):
        try:
            saved = torch.load(args.check)
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError):
            pass
        if not isinstance(saved, dict):
            p.error(f"--check: {args.check} is not a file this script saved")
    use_checkout(args.repo)
    from dgc.transport import gtopk

    torch.set_num_threads(1)
    slots = QUICK if args.quick else WIDE_MLP
    repeats = 3 if args.quick else args.repeats
    g = torch.Generator().manual_seed(0)
    offsets, n = [], 0
    for numel, _ in slots:
        offsets.append(n)
        n += numel
    ks = [k for _, k in slots]

    def one_set() -> torch.Tensor:
        return torch.cat([torch.randperm(numel, generator=g)[:k] + offset
                          for (numel, k), offset in zip(slots, offsets)])

    mine, theirs = one_set(), one_set()
    shared = ks[0] // 3
    theirs[:shared] = mine[shared:2 * shared]
    mine_val = torch.randn(mine.numel(), generator=g).half()
    theirs_val = torch.randn(theirs.numel(), generator=g).half()

    # the merges that return places (2026-12-01 on); before, membership came from isin
    placed = "by_magnitude" in inspect.signature(gtopk.merge_slots).parameters

    def gtopk_round():
        if placed:
            idx, val, place = gtopk._merge_pair(mine, mine_val, theirs, theirs_val, ks, True, n)
            return idx, val, place >= 0
        idx, val = gtopk._merge_pair(mine, mine_val, theirs, theirs_val, ks, True, n)
        return idx, val, torch.isin(mine, idx)

    def node_merge():
        rows_idx, rows_val = torch.stack([mine, theirs]), torch.stack([mine_val, theirs_val])
        if placed:
            idx, val, place = gtopk.merge_slots(rows_idx, rows_val, ks, n, by_magnitude=False)
            held = place[0] >= 0
        else:  # before 2026-12-01: by magnitude, membership by isin
            idx, val = gtopk.merge_slots(rows_idx, rows_val, ks, n)
            held = torch.isin(mine, idx)
        return idx, val, held

    def in_index_order(idx, val, held):  # one order to compare the two versions in
        order = torch.argsort(idx, stable=True)
        return idx[order], val[order], held

    results = {}
    for name, fn, compared in (
            ("gtopk round", gtopk_round, lambda *out: out),
            ("node merge (sparse intra-node stage)", node_merge, in_index_order)):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        results[name] = compared(*fn())
        print(f"{name}: median {statistics.median(times) * 1e3:.2f} ms over {repeats} "
              f"({os.path.dirname(gtopk.__file__)})")
    if args.check:
        if saved is not None:
            same = all(torch.equal(a, b) for name in saved
                       for a, b in zip(saved[name], results[name]))
            print(f"the same bits as {args.check}" if same else f"DIFFERENT from {args.check}")
            return 0 if same else 1
        torch.save(results, args.check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
