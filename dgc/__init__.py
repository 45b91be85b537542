"""Deep Gradient Compression (Lin et al., ICLR 2018) as a DDP communication hook.

    state = dgc.attach(ddp_model, sgd_optimizer, density=0.001)   # or, by hand:
    ddp_model.register_comm_hook(dgc.DGCState(model=ddp_model, momentum=0.9), dgc.dgc_hook)
    ...
    state.set_epoch(epoch)        # drives the warm-up density schedule

With weight sparsity: ``dgc.attach(ddp_model, opt, sparsifier=sparse_train.attach(...))``.
``dgc.Compressor`` is the per-tensor algorithm without communication, for other transports.
"""
from dgc.attach import attach
from dgc.compressor import Compressor
from dgc.hook import DGCState, DGCStats, dgc_hook
from dgc.options import DGCOptions

__all__ = ["attach", "Compressor", "DGCOptions", "DGCState", "DGCStats", "dgc_hook"]
