"""Deep Gradient Compression and 2:4 weight sparsity in an HF Accelerate training loop.

    accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 examples/accelerate_dgc.py

``--multi_gpu`` selects Accelerate's torchrun-based launcher, which starts the processes on
a CPU-only machine too (``--cpu`` alone starts one process unless an MPI hostfile is given);
``torchrun --standalone --nproc-per-node=2 examples/accelerate_dgc.py`` does the same. The
data is a synthetic 10-class task shaped like MNIST, so the example runs anywhere.
"""
import argparse

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dgc
import sparse_train


def synthetic_mnist(samples: int = 2048) -> TensorDataset:
    """784-pixel inputs labelled by a fixed random linear teacher."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 784, generator=g)
    return TensorDataset(x, (x @ torch.randn(784, 10, generator=g)).argmax(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    args = p.parse_args()
    # Without cpu=True, Accelerate on a machine without GPUs would not join the processes.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=args.accumulate)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                          nn.Linear(100, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loader = DataLoader(synthetic_mnist(), batch_size=32, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    # Both take what prepare returned: the DDP model and the AcceleratedOptimizer.
    sparsifier = sparse_train.attach(model, optimizer, method="nm", nm_start_step=8)
    state = dgc.attach(model, optimizer, sparsifier=sparsifier, density=0.01, warmup_epochs=1)

    for epoch in range(args.epochs):
        state.set_epoch(epoch)  # the warm-up: 10% of each gradient in epoch 0, then 1%
        for x, y in loader:
            # accumulate() skips DDP's sync, and so DGC, until the last micro-batch
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.cross_entropy(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
        accelerator.print(f"epoch {epoch}: {state.compression_stats()}")
    stats = state.compression_stats()
    accelerator.print(f"DGC: {stats['steps']} steps, {stats['compression_ratio']:.1f}x fewer "
                      f"bytes than allreduce; weights kept: {sparsifier.report()['density']:.2f}")


if __name__ == "__main__":
    main()
