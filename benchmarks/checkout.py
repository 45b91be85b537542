"""``--repo`` of the benchmarks that time another checkout's code (exchange_step.py,
merge_cost.py): its argparse type, and the switch to that checkout's packages."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def checkout(text: str) -> Path:
    """An argparse type: a folder that holds a ``dgc`` package."""
    path = Path(text).resolve()
    if not (path / "dgc").is_dir():
        raise argparse.ArgumentTypeError(f"no dgc package in {text!r}")
    return path


def use_checkout(repo: Path) -> None:
    """Import the project's packages from ``repo`` from here on: it goes first on sys.path,
    and every module already imported from this checkout (the parser's) is forgotten."""
    if repo == HERE:
        return
    sys.path.insert(0, str(repo))
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name != "__main__" and file and Path(file).resolve().is_relative_to(HERE):
            del sys.modules[name]
