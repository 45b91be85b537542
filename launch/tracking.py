"""Weights & Biases logging from rank 0 that never stops or slows training, nor loses a row.

Mode "online" is used only when credentials exist and the server answers a TCP connection
within a few seconds (``reachable``); otherwise the run is recorded offline, with one line
telling how to sync it later (``wandb sync``): credentials without a network used to hold
``wandb.init`` for its 60 s timeout and then leave no record at all. A wandb failure in the
middle of a run switches to a new offline run that first replays every row and the summary
logged so far, so the wandb record still holds everything ``metrics.jsonl`` does; only if
that fails too is wandb given up for the run.
"""
from __future__ import annotations

import logging
import netrc
import os
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sparse_comm.atomic import replace_text

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


SERVER = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 3.0


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds. The name
    lookup, which socket timeouts do not cover, runs in the same bounded thread."""
    parsed = urlparse(url if "//" in url else f"https://{url}")
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    answer: list[bool] = []

    def probe():
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            answer.append(True)
        except (OSError, UnicodeError):
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answer and answer[0])


class Tracker:
    """A thin guard around one wandb run; every method is a no-op once disabled.

    ``reopen``, if given, starts an offline run to carry on in when the current one fails;
    the rows and summary logged so far are replayed into it."""

    def __init__(self, run=None, reopen: Callable[[], Any] | None = None):
        self._run, self._reopen = run, reopen
        self._rows: list[dict[str, Any]] = []
        self._summary: dict[str, Any] = {}

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
            self._fail_over(what, err)

    def _fail_over(self, what: str, err: Exception) -> None:
        reopen, self._reopen, self._run = self._reopen, None, None
        if reopen is None:
            log.warning("wandb %s failed (%s); wandb logging is off for the rest of the run",
                        what, err)
            return
        try:
            run = reopen()
            for row in self._rows:
                run.log(row)
            if self._summary:
                run.summary.update(self._summary)
        except Exception as again:
            log.warning("wandb %s failed (%s) and an offline run could not take over (%s); "
                        "wandb logging is off for the rest of the run", what, err, again)
            return
        self._run = run
        log.warning("wandb %s failed (%s); continuing in an offline run that holds every row "
                    "so far; sync it later with: wandb sync %s", what, err,
                    Path(run.dir).parent)

    def log(self, metrics: dict[str, Any]) -> None:
        self._rows.append(metrics)
        self._guard("log", lambda: self._run.log(metrics))

    def summary(self, values: dict[str, Any]) -> None:
        self._summary.update(values)
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


RUN_ID_FILE = "wandb_run_id"


def run_id(out_dir: Path, resuming: bool) -> str:
    """The wandb run id of the run in ``out_dir``: the one its first attempt stored there
    when ``resuming`` (so a restart or ``--resume`` continues that wandb run instead of
    opening another of the same name), else a new one, stored for the attempts to come."""
    path = Path(out_dir) / RUN_ID_FILE
    if resuming and path.is_file():
        found = path.read_text().strip()
        if found.isalnum():
            return found
    made = uuid.uuid4().hex[:12]
    replace_text(path, made)
    return made


def start(mode: str, project: str, name: str, out_dir: str | Path, config: dict,
          group: str | None = None, entity: str | None = None, tags: list[str] = (),
          job_type: str = "train", define_axes: bool = True,
          resuming: bool | None = None) -> Tracker:
    """Start a wandb run writing under ``out_dir`` (rank 0 only; callers decide). A
    training run passes ``resuming`` (whether it continues a checkpoint): its wandb run id
    is kept in ``out_dir`` (``run_id``), so a resumed attempt continues the same wandb run."""
    mode = resolve_mode(mode)
    if mode == "disabled":
        return Tracker()
    known = run_id(Path(out_dir), resuming) if resuming is not None else None
    server = os.environ.get("WANDB_BASE_URL", SERVER)
    if mode == "online" and not reachable(server):
        log.warning("wandb: %s does not answer; recording this run offline instead", server)
        mode = "offline"

    def open_run(run_mode: str, first: bool = False):
        # A stand-in after a failure takes an id of its own: the failed attempt holds
        # ``known`` in this process.
        import wandb
        run = wandb.init(project=project, name=name, group=group, entity=entity,
                         tags=list(tags) or None, job_type=job_type, config=config,
                         dir=str(out_dir), mode=run_mode, reinit="create_new",
                         id=known if first else None,
                         resume="allow" if first and resuming else None,
                         settings=wandb.Settings(silent=True, console="off",
                                                 init_timeout=60, x_disable_stats=True))
        if define_axes:
            run.define_metric(STEP_AXIS)
            run.define_metric(BYTES_AXIS)
            run.define_metric("train/*", step_metric=STEP_AXIS)
            run.define_metric("comm/*", step_metric=STEP_AXIS)
            run.define_metric("test/*", step_metric=BYTES_AXIS)
            run.define_metric("epoch/*", step_metric=BYTES_AXIS)
        return run

    try:
        run = open_run(mode, first=True)
    except Exception as err:
        if mode == "offline":
            log.warning("wandb could not start (%s); training continues without it", err)
            return Tracker()
        log.warning("wandb could not start online (%s); recording this run offline", err)
        try:
            run, mode = open_run("offline"), "offline"
        except Exception as again:
            log.warning("wandb could not start (%s); training continues without it", again)
            return Tracker()
    if mode == "offline":
        log.info("wandb is offline; sync later with: wandb sync %s", Path(run.dir).parent)
        return Tracker(run)
    return Tracker(run, reopen=lambda: open_run("offline"))
