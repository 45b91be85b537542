"""Command-line conventions shared by the launch tools: bad input is one line and exit 2."""
import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from sparse_comm.schema import ConfigError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line on stderr, with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# Types for ``add_argument(type=...)``: each raises ArgumentTypeError with a short message,
# which argparse reports as "argument --x: <message>".

def _argument(convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str,
              many: bool) -> Callable[[str], Any]:
    """A ``type=`` function: ``convert`` of the text (of each comma-separated part if
    ``many``), every value passing ``ok``; else "expected <expected>, got '<text>'"."""
    def parse(text: str):
        problem = argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        try:
            values = [convert(part) for part in (text.split(",") if many else [text])]
        except ValueError:
            raise problem from None
        if not all(map(ok, values)):
            raise problem
        return values if many else values[0]
    return parse


def integer(low: int) -> Callable[[str], int]:
    """An integer >= ``low``: ``type=integer(1)`` for a count of steps."""
    return _argument(int, lambda v: v >= low, f"an integer >= {low}", many=False)


def integers(low: int) -> Callable[[str], list[int]]:
    """Comma-separated integers, each >= ``low``: ``"8,64,512"`` as [8, 64, 512]."""
    return _argument(int, lambda v: v >= low, f"comma-separated integers >= {low}", many=True)


def _bounds(low: float, high: float, low_open: bool, high_open: bool
            ) -> tuple[Callable[[float], bool], str]:
    """A test that a number is finite and between ``low`` and ``high`` (each end included
    unless open), and those bounds in words: "> 0", "in (0, 1]"."""
    def within(value: float) -> bool:
        return (math.isfinite(value) and (value > low if low_open else value >= low)
                and (value < high if high_open else value <= high))
    if high == math.inf:
        return within, f"{'>' if low_open else '>='} {low:g}"
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return within, f"in {left}{low:g}, {high:g}{right}"


def real(low: float, high: float = math.inf, *, low_open: bool = False,
         high_open: bool = False) -> Callable[[str], float]:
    """A finite number from ``low`` to ``high``, each end included unless marked open:
    ``type=real(0, 100, low_open=True)`` for an accuracy in percent."""
    within, words = _bounds(low, high, low_open, high_open)
    return _argument(float, within, f"a number {words}", many=False)


def reals(low: float, high: float = math.inf, *, low_open: bool = False,
          high_open: bool = False) -> Callable[[str], list[float]]:
    """Comma-separated numbers, each as :func:`real` takes them: ``type=reals(0, 1,
    low_open=True)`` for densities in (0, 1]."""
    within, words = _bounds(low, high, low_open, high_open)
    return _argument(float, within, f"comma-separated numbers {words}", many=True)


positive = real(0, low_open=True)  # a finite number > 0: seconds, a budget


def existing_dir(text: str) -> Path:
    """The path of a directory that exists."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return Path(text)


def existing_file(text: str) -> Path:
    """The path of a file that exists."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return Path(text)


def output_folder(text: str) -> Path:
    """The path of a folder to write into, made now with its parents, so that one that
    cannot be fails before any work is done."""
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise argparse.ArgumentTypeError(
            f"cannot make the folder {path}: {err.strerror}") from None
    return path


def output_file(text: str) -> Path:
    """The path of a file to write, its folder made now (as ``output_folder``)."""
    output_folder(str(Path(text).parent))
    return Path(text)


def png_file(text: str) -> Path:
    """``output_file`` for a chart: its name must end in .png (matplotlib would add the
    suffix itself, and the path printed and logged would name no file)."""
    if Path(text).suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text}: a chart is a PNG, name it *.png")
    return output_file(text)


def output_dir(path: Path, flag: str) -> Path:
    """``output_folder`` for a folder known only after parsing: ConfigError under ``flag``
    (one line) where it cannot be made."""
    try:
        return output_folder(str(path))
    except argparse.ArgumentTypeError as err:
        raise ConfigError(flag, str(err)) from None


def lock_file(path: Path | None, flag: str = "--lock") -> None:
    """Check that the lock file ``path`` (if any) can be opened for the flock."""
    if path is None:
        return
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise ConfigError(flag, f"cannot open {path} as a lock file: {err.strerror}") from None


def quiet_on_closed_pipe(main: Callable[[], int]) -> int:
    """``main()``'s status, or 1 without a BrokenPipeError traceback when the reader of
    stdout goes away (``| head``); stdout then points at /dev/null so that Python's own
    flush at exit stays quiet too (the recipe in the docs of Python's signal module)."""
    try:
        status = main()
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
