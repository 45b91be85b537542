"""Rank 0's records of a run: ``metrics.jsonl`` and ``summary.json``, and their wandb mirror.

Both files are strict JSON: a non-finite number (a diverged loss) is written as null, never
as the ``NaN`` that ``json.dumps`` would emit and JSON parsers reject.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from launch import tracking
from sparse_comm.atomic import replace_text


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts and lists too) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def keep_rows_up_to(metrics: Path, step: int) -> None:
    """Drop the rows an interrupted attempt logged after ``step``, the step its checkpoint
    holds: the resumed run logs them again, so each step stays in the file once."""
    if not metrics.is_file():
        return
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a row cut short when the attempt died mid-write
            continue
        if isinstance(row, dict) and row.get(tracking.STEP_AXIS, 0) <= step:
            rows.append(line)
    text = "".join(row + "\n" for row in rows)
    replace_text(metrics, text)


class RunWriter:
    """Rank 0's records (``enabled``); every other rank's calls do nothing."""

    def __init__(self, out_dir: Path, tracker: tracking.Tracker, enabled: bool):
        self.out_dir, self.tracker, self.enabled = out_dir, tracker, enabled
        self._metrics = open(out_dir / "metrics.jsonl", "a") if enabled else None

    def record(self, row: dict) -> None:
        if not self.enabled:
            return
        self._metrics.write(dumps(row) + "\n")
        self._metrics.flush()
        self.tracker.log(strict(row))

    def summary(self, summary: dict) -> None:
        if not self.enabled:
            return
        text = dumps(summary, indent=2) + "\n"
        replace_text(self.out_dir / "summary.json", text)
        self.tracker.summary(strict(summary))

    def close(self) -> None:
        if self._metrics:
            self._metrics.close()
        self.tracker.finish()
