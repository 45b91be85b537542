"""Sparsity methods, each a mask rule plus a schedule; ``build_method`` picks one by name."""
from __future__ import annotations

from ..options import SparsityOptions
from .base import Method
from .dns import DNS
from .dsd import DSD
from .gmp import Pruning, cubic_sparsity
from .iht import IHT, iht_phase
from .nm import NM
from .nonzero import NonZero
from .structured import ChannelPruning, GroupLasso


def build_method(options: SparsityOptions) -> Method:
    if options.method in ("magnitude", "gmp", "block", "bank"):
        return Pruning(options)
    if options.method in ("channel", "slimming"):
        return ChannelPruning(options)
    if options.method == "group_lasso":
        return GroupLasso(options)
    if options.method == "nonzero":
        return NonZero(options)
    if options.method == "nm":
        return NM(options)
    if options.method == "dns":
        return DNS(options)
    if options.method == "iht":
        return IHT.from_options(options)
    assert options.method == "dsd", options.method
    return DSD.from_options(options)


__all__ = ["Method", "build_method", "cubic_sparsity", "iht_phase",
           "Pruning", "NM", "DNS", "IHT", "DSD", "ChannelPruning", "GroupLasso", "NonZero"]
