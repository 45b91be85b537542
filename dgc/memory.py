"""Per-tensor memory of DGC: local clipping, momentum correction, accumulation and masking.

Pure in-place tensor functions on flat (1-D) tensors; the caller owns the buffers. Notation
follows Lin et al. (ICLR 2018, Sec. 3.2): ``u`` is the momentum, ``v`` the accumulated update
not yet sent. Momentum is written the way ``torch.optim.SGD`` writes it (dampening 0), so
that with nothing dropped DGC reproduces SGD exactly:

    u <- m * u + g
    d  = u            (heavy ball)      or   g + m * u   (Nesterov)
    v <- v + d

None of these functions reads a tensor value on the host, so on CUDA they never synchronise.
"""
from __future__ import annotations

import torch
from torch import Tensor


def clip_(g: Tensor, max_norm: float) -> Tensor:
    """Scale ``g`` in place so its L2 norm is at most ``max_norm``; returns ``g``.

    The scale is computed on the device (``min(1, max_norm / norm)``), never branched on.
    """
    scale = (max_norm / (torch.linalg.vector_norm(g) + 1e-6)).clamp_(max=1.0)
    return g.mul_(scale)


def momentum_step_(u: Tensor, g: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """Advance the momentum ``u`` by ``g`` in place and return this step's update direction.

    Without Nesterov the result *is* ``u`` (not a copy): use it before touching ``u`` again.
    """
    u.mul_(momentum).add_(g)
    return g.add(u, alpha=momentum) if nesterov else u


def accumulate_(u: Tensor, v: Tensor, g: Tensor, momentum: float, nesterov: bool) -> None:
    """Momentum correction then local accumulation: ``v += momentum_step_(u, g)``."""
    v.add_(momentum_step_(u, g, momentum, nesterov))


def mask_(u: Tensor, v: Tensor, indices: Tensor, sent: Tensor, momentum_masking: bool) -> None:
    """Take what was sent out of the memory.

    ``v`` loses exactly ``sent`` at ``indices`` (zero when the values went out at full
    precision; the rounding error otherwise, which is then sent later instead of lost).
    With ``momentum_masking`` the momentum at those positions is zeroed too.
    """
    v.index_add_(0, indices, sent.to(v.dtype), alpha=-1)
    if momentum_masking:
        u.index_fill_(0, indices, 0)
