"""Command-line conventions shared by the launch tools: bad input is one line and exit 2."""
import argparse
from pathlib import Path

from sparse_comm.schema import ConfigError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line on stderr, with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def output_dir(path: Path, flag: str) -> Path:
    """``path`` made, with its parents, for a tool's output; ConfigError under ``flag`` (one
    line) where it cannot be, before any work is done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(flag, f"cannot make the folder {path}: {err.strerror}") from None
    return path


def lock_file(path: Path | None, flag: str = "--lock") -> None:
    """Check that the lock file ``path`` (if any) can be opened for the flock."""
    if path is None:
        return
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise ConfigError(flag, f"cannot open {path} as a lock file: {err.strerror}") from None
