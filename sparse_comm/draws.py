"""Random draws that are pure functions of their key, never positions in a shared stream.

A stream shared across tensors hands out its numbers in the order tensors ask. DDP hands
buckets to a hook in an order that changes when it rebuilds them (its first iteration
after construction uses the registration order, later ones the order gradients became
ready), so a restored run whose new DDP model asks in a different order would give each
tensor another tensor's numbers. Hashing (seed, rank, parameter name, step) instead gives
every tensor its own numbers whatever was drawn before it, on every rank and after every
restart, and costs no device work (the draw is a Python int: no host sync on CUDA).
"""
from __future__ import annotations

import hashlib

_SCALE = 2.0 ** -64


def integer(*key: object) -> int:
    """A uniform 64-bit non-negative integer determined by ``key`` (ints and strings)."""
    text = "\x1f".join(f"{type(part).__name__}:{part}" for part in key)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def uniform(*key: object) -> float:
    """A uniform float in [0, 1) determined by ``key``."""
    return integer(*key) * _SCALE
