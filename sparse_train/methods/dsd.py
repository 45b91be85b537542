"""Dense-sparse-dense training (Han et al. 2017, ICLR).

Train dense for ``dsd_dense_steps``; prune to ``target`` by magnitude and train sparse
for ``dsd_sparse_steps``; then lift the mask and train dense for the rest of the run. The
pruned weights restart from zero: they are exactly zero when the mask is lifted, and
their momentum / Adam moments were zeroed when they were pruned and have received no
gradient since.

This is one IHT cycle that ends dense, so it reuses IHT's schedule. The paper also lowers
the learning rate for the final dense phase; that is left to the user's LR schedule.
"""
from __future__ import annotations

from ..options import SparsityOptions
from .iht import IHT


class DSD(IHT):
    @classmethod
    def from_options(cls, o: SparsityOptions) -> "DSD":
        return cls(o.target, o.scope, o.dsd_dense_steps, o.dsd_sparse_steps,
                   cycles=1, end="dense", patterns=o.layers)
