"""Accuracy per byte: runs grouped into settings, their Pareto front, bytes to a target.

Pure functions over what ``launch.compare.load_run`` reads from run directories. A
*setting* is every run of one config that differs only by seed (and where it was written);
its point is the mean final test accuracy, with the spread over seeds, against the mean
whole-run bytes sent per rank. A *scheme* is the family of a run's gradient exchange
(dense, fp16, bf16, PowerSGD, DGC), the unit the front is drawn for: a setting is on its
scheme's front when no other setting of that scheme reaches at least its accuracy with
at most its bytes.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

# Config keys that say where or under which name a run went, not what it did.
_NOT_SETTING = ("train.seed", "run_name", "out_dir", "wandb.")


def spread(values: list[float]) -> float:
    """Sample standard deviation (0 for one value; NaN in, NaN out, where statistics.stdev
    raises)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class SettingPoint:
    model: str
    scheme: str
    label: str
    runs: list[dict] = field(repr=False)

    @property
    def accuracies(self) -> list[float]:
        return [100 * r["summary"]["test_accuracy"] for r in self.runs]

    @property
    def accuracy(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def spread(self) -> float:
        return spread(self.accuracies)

    @property
    def processes(self) -> int | None:
        """The runs' number of processes (every run of a setting has the same)."""
        return processes_of(self.runs[0])

    @property
    def bytes_sent(self) -> float:
        return statistics.fmean(r["summary"]["comm_bytes_sent"] for r in self.runs)

    def mean_curve(self) -> list[tuple[float, float, float]]:
        """(bytes, accuracy %, step) per epoch, averaged over the seeds (over the epochs
        all of them reached)."""
        n = min(len(r["curve"]) for r in self.runs)
        return [(statistics.fmean(r["curve"][i][0] for r in self.runs),
                 statistics.fmean(100 * r["curve"][i][1] for r in self.runs),
                 statistics.fmean(r["curve"][i][2] for r in self.runs)) for i in range(n)]

    def to_target(self, target: float) -> tuple[float, float] | None:
        """(bytes, steps) at the first epoch whose mean accuracy reaches ``target`` (%)."""
        return next(((b, s) for b, acc, s in self.mean_curve() if acc >= target), None)


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def scheme_of(config: dict) -> str:
    if config.get("dgc"):
        return "DGC"
    hook = (config.get("ddp") or {}).get("comm_hook", "allreduce")
    return {"allreduce": "dense", "powersgd": "PowerSGD"}.get(hook, hook)


def model_of(config: dict) -> str:
    model = config.get("model")
    return model.get("name", "") if isinstance(model, dict) else ""


def processes_of(run: dict) -> int | None:
    """A run's number of processes: torchrun sets it, so it is in the summary, not the
    config."""
    return run["summary"].get("world_size")


def _what(run: dict) -> tuple:
    """The run's setting: its config but for the seed and names, and its number of
    processes (not in the config: runs at 4 and 8 processes are two settings, not seeds)."""
    flat = flatten(run["config"])
    keys = [(k, repr(v)) for k, v in flat.items()
            if not any(k == n or k.startswith(n) for n in _NOT_SETTING)]
    return tuple(sorted(keys + [("processes", repr(processes_of(run)))]))


def group_settings(runs: list[dict]) -> list[SettingPoint]:
    """Runs of the same config but for the seed become one setting, labelled by the config
    keys that tell it apart from the other settings of its model and scheme."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        groups[_what(run)].append(run)
    by_family: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    for key, members in groups.items():
        config = members[0]["config"]
        by_family[(model_of(config), scheme_of(config))].append(key)
    points = []
    for (model, scheme), keys in by_family.items():
        varying = {k for k, _ in set().union(*keys)} if len(keys) > 1 else set()
        varying = {k for k in varying if len({dict(key).get(k) for key in keys}) > 1}
        for key in keys:
            values = dict(key)
            label = ", ".join(f"{k.split('.', 1)[-1]}={values.get(k, '-')}"
                              for k in sorted(varying)
                              if values.get(k, "None") != "None") or scheme
            points.append(SettingPoint(model, scheme, label, groups[key]))
    return sorted(points, key=lambda p: (p.model, p.scheme, p.bytes_sent))


def front(points: list[SettingPoint]) -> list[SettingPoint]:
    """The non-dominated points, cheapest first: each more accurate than every cheaper one."""
    best, out = float("-inf"), []
    for point in sorted(points, key=lambda p: (p.bytes_sent, -p.accuracy)):
        if point.accuracy > best:
            out.append(point)
            best = point.accuracy
    return out


def fronts(points: list[SettingPoint]) -> dict[tuple, list[SettingPoint]]:
    """The front of each (model, scheme, number of processes): a setting at 4 processes
    does not dominate one at 8, which sends other bytes for another batch."""
    families: dict[tuple, list[SettingPoint]] = defaultdict(list)
    for point in points:
        families[(point.model, point.scheme, point.processes)].append(point)
    return {family: front(members) for family, members in families.items()}


def cheapest_to_target(points: list[SettingPoint], target: float
                       ) -> dict[tuple, tuple[SettingPoint, float, float] | None]:
    """Per (model, scheme, number of processes), as ``fronts`` groups them: the setting that
    reaches ``target`` (%) with the fewest bytes, with those bytes and the steps it took;
    None where no setting reaches it."""
    out: dict[tuple, tuple[SettingPoint, float, float] | None] = {}
    for point in points:
        family = (point.model, point.scheme, point.processes)
        reached = point.to_target(target)
        out.setdefault(family, None)
        if reached is not None and (out[family] is None or reached[0] < out[family][1]):
            out[family] = (point, *reached)
    return out


def step_time(points: list[tuple[float, float]], bytes_per_step: float) -> float:
    """Seconds per step at ``bytes_per_step``, interpolated linearly between measured
    (bytes per step, seconds per step) points of one scheme; held flat beyond the ends."""
    if not points:
        raise ValueError("no measured step times")
    points = sorted(points)
    if bytes_per_step <= points[0][0]:
        return points[0][1]
    for (b0, t0), (b1, t1) in zip(points, points[1:]):
        if bytes_per_step <= b1:
            return t0 + (t1 - t0) * (bytes_per_step - b0) / (b1 - b0) if b1 > b0 else t1
    return points[-1][1]


def time_to_target(point: SettingPoint, target: float, measured: list[tuple[float, float]]
                   ) -> tuple[float, float] | None:
    """(seconds, steps) for ``point`` to reach ``target`` (%): each epoch of its mean curve
    costs its steps times the step time at that epoch's bytes per step (so a warm-up or a
    dense start is priced at what it sends); None where the target is never reached."""
    seconds, last_bytes, last_step = 0.0, 0.0, 0.0
    for sent, accuracy, step in point.mean_curve():
        steps = step - last_step
        if steps > 0:
            seconds += steps * step_time(measured, (sent - last_bytes) / steps)
        if accuracy >= target:
            return seconds, step
        last_bytes, last_step = sent, step
    return None
