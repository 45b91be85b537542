"""Atomic checkpoints: a reader sees the previous file or the new one, never half of one."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparse_comm.atomic import replace_atomic


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    replace_atomic(path, lambda f: torch.save(obj, f))


def load(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
