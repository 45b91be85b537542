"""Weights & Biases logging from rank 0 that never stops or slows training.

Mode "online" is used only when credentials exist; otherwise the run goes offline with one
line telling how to sync it later. Any wandb failure disables further logging with one
warning: the run's own ``metrics.jsonl`` and ``summary.json`` stay the record of truth.
"""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Accuracy and loss are charted against cumulative wire bytes as well as against steps.
BYTES_AXIS = "comm/bytes_sent_cum"
STEP_AXIS = "train/step"


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai")
                                            .removeprefix("https://").removeprefix("http://"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def resolve_mode(requested: str) -> str:
    env = os.environ.get("WANDB_MODE")
    if env in ("offline", "disabled", "dryrun"):
        return "disabled" if env == "disabled" else "offline"
    if requested == "online" and not has_credentials():
        return "offline"
    return requested


class Tracker:
    """A thin guard around one wandb run; every method is a no-op once disabled."""

    def __init__(self, run=None):
        self._run = run

    @property
    def active(self) -> bool:
        return self._run is not None

    @property
    def run_dir(self) -> str | None:
        return None if self._run is None else str(Path(self._run.dir).parent)

    def _guard(self, what: str, fn, *args, **kwargs):
        if self._run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # wandb must never take training down
            log.warning("wandb %s failed (%s); wandb logging is off for the rest of the run",
                        what, err)
            self._run = None

    def log(self, metrics: dict[str, Any]) -> None:
        self._guard("log", lambda: self._run.log(metrics))

    def summary(self, values: dict[str, Any]) -> None:
        self._guard("summary", lambda: self._run.summary.update(values))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        def write():
            import wandb
            self._run.log({key: wandb.Table(columns=columns, data=rows)})
        self._guard("table", write)

    def log_image(self, key: str, path: str) -> None:
        def write():
            import wandb
            self._run.log({key: wandb.Image(path)})
        self._guard("image", write)

    def finish(self) -> None:
        self._guard("finish", lambda: self._run.finish())
        self._run = None


def start(mode: str, project: str, name: str, out_dir: str | Path, config: dict,
          group: str | None = None, entity: str | None = None, tags: list[str] = (),
          job_type: str = "train", define_axes: bool = True) -> Tracker:
    """Start a wandb run writing under ``out_dir`` (rank 0 only; callers decide)."""
    mode = resolve_mode(mode)
    if mode == "disabled":
        return Tracker()
    try:
        import wandb

        run = wandb.init(project=project, name=name, group=group, entity=entity,
                         tags=list(tags) or None, job_type=job_type, config=config,
                         dir=str(out_dir), mode=mode, reinit="create_new",
                         settings=wandb.Settings(silent=True, console="off",
                                                 init_timeout=60, x_disable_stats=True))
        if define_axes:
            run.define_metric(STEP_AXIS)
            run.define_metric(BYTES_AXIS)
            run.define_metric("train/*", step_metric=STEP_AXIS)
            run.define_metric("comm/*", step_metric=STEP_AXIS)
            run.define_metric("test/*", step_metric=BYTES_AXIS)
            run.define_metric("epoch/*", step_metric=BYTES_AXIS)
    except Exception as err:
        log.warning("wandb could not start (%s); training continues without it", err)
        return Tracker()
    if mode == "offline":
        log.info("wandb is offline (no credentials or WANDB_MODE=offline); sync later with: "
                 "wandb sync %s", Path(run.dir).parent)
    return Tracker(run)
