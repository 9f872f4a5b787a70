"""Runs side by side: what differs between them and how each one did.

``fedcoord compare``, the dashboard's comparison and the end of ``fedcoord sweep``
read the same numbers from here (shown as text and PNG by
:mod:`server.record.compare_report`). Every run directory is read read-only
through the run store; nothing here writes to one.

Per run: its state, its strategy and the config keys whose values differ between
the runs compared, the final and best central accuracy, the round and the wall
time at which central accuracy first reached ``target``, the rejected replies
and the cumulative epsilon where a round records one. Wall time is the time
spent in rounds (the sum of their durations, round 0's central evaluation
included): time paused, or down before a resume, is left out, so that a run
interrupted and resumed is measured like one that was not. A value no run can
have (an accuracy outside [0, 1], a negative, infinite or absurd duration, a
negative epsilon) is read as missing and shown ``-``, never as a number. Runs that differ only
in ``seed`` are also summarised as mean and sample standard deviation over seeds.
Epsilon is infinite for a run without noise: ``inf`` in text, and in strict JSON,
which has no infinity, ``null`` beside ``epsilon_text`` ``"inf"``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from server.record.runs import effective_state, resolve_run_dir, stored_config
from server.record.schema import int_value, real_or_none, stored_number
from server.record.store import RunStore, RunStoreError

# Keys that name, place or track a run but do not change what it trains.
NOT_COMPARED_KEYS = frozenset(
    (
        "run-name",
        "runs-dir",
        "resume",
        "data-dir",
        "dataset-defaults",
        "tracking-uri",
        "tracking-experiment",
    )
)
SEED_KEY = "seed"
STRATEGY_KEY = "strategy"
# The round row's column (or stored metric) holding the cumulative privacy spent.
EPSILON_KEY = "epsilon"
MAX_COMPARED_RUNS = 20
# Seconds in rounds beyond which a run's wall time is not believed (about 31 years):
# a tampered or broken duration, missing rather than a number no chart can scale to.
MAX_WALL_TIME_S = 1e9


class CompareError(ValueError):
    """A comparison that cannot be made as asked; the message names the fix."""


@dataclass(frozen=True)
class RoundPoint:
    """One round of a run as the comparison sees it."""

    round: int
    elapsed_s: float | None
    central_accuracy: float | None
    rejected: int
    epsilon: float | None


@dataclass(frozen=True)
class RunRecord:
    """What the comparison reads from one run directory."""

    name: str
    state: str
    num_rounds: int
    config: Mapping[str, object]
    points: tuple[RoundPoint, ...]


# ------------------------------------------------------------------ input
def validate_target(target: float | None) -> float | None:
    """``target`` when it is None or an accuracy in [0, 1].

    Raises
    ------
    CompareError
        Otherwise (NaN too).
    """
    if target is None:
        return None
    if not 0.0 <= target <= 1.0:
        raise CompareError(f"target must be an accuracy in [0, 1], got {target}; e.g. 0.9")
    return float(target)


def validate_run_names(names: Sequence[str]) -> list[str]:
    """The run names of a comparison: at least two, at most 20, each once.

    Raises
    ------
    CompareError
        Naming what to change.
    """
    if len(names) < 2:
        shown = f" (only {names[0]!r})" if names else ""
        raise CompareError(f"compare needs at least two runs{shown}; name another run")
    if len(names) > MAX_COMPARED_RUNS:
        raise CompareError(
            f"compare takes at most {MAX_COMPARED_RUNS} runs, got {len(names)}; name fewer"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CompareError(f"run {repeated[0]!r} is named twice; name each run once")
    return list(names)


def resolve_compared(runs_dir: Path, names: Sequence[str]) -> list[Path]:
    """The run directories of ``names`` after :func:`validate_run_names`.

    Raises
    ------
    CompareError
        From :func:`validate_run_names`.
    task.names.RunNameError, server.record.runs.RunNotFoundError
        For a name that is not a run of ``runs_dir``.
    """
    return [resolve_run_dir(runs_dir, name) for name in validate_run_names(names)]


# ------------------------------------------------------------------ reads
def read_run_record(run_dir: Path, now: float | None = None) -> RunRecord:
    """Read one run for the comparison (read-only).

    Raises
    ------
    RunStoreError
        If its ``run.db`` cannot be read; the message names the run and the fix.
    """
    try:
        store = RunStore(run_dir, readonly=True)
        try:
            run, rows = store.run_row(), store.rounds()
        finally:
            store.close()
    except RunStoreError as error:
        raise RunStoreError(
            f"{error}; leave {run_dir.name} out of the comparison "
            f"(fedcoord verify {run_dir.name} says more)"
        ) from None
    heartbeat_at = real_or_none(run, "heartbeat_at")
    state = effective_state(str(run["state"]), heartbeat_at, now or time.time())
    return RunRecord(
        name=run_dir.name,
        state=state,
        num_rounds=int_value(run, "num_rounds"),
        config=stored_config(run["config_json"]),
        points=tuple(round_points(rows)),
    )


def round_points(rows: Iterable[Mapping[str, object]]) -> list[RoundPoint]:
    """Round rows (oldest first) as points, with the wall time spent in rounds so far.

    A central accuracy outside [0, 1] (or not a number) is missing. So is the wall
    time from the first round whose duration is negative or not finite, or that
    takes the total past :data:`MAX_WALL_TIME_S`: no later total can be trusted.
    """
    points: list[RoundPoint] = []
    elapsed: float | None = 0.0
    for row in rows:
        duration = _number(row.get("duration_s"))
        if elapsed is not None:
            total = elapsed + duration if duration is not None and duration >= 0 else math.inf
            elapsed = total if total <= MAX_WALL_TIME_S else None
        points.append(
            RoundPoint(
                round=int(row["round"]),  # type: ignore[call-overload]
                elapsed_s=elapsed,
                central_accuracy=_accuracy(row.get("central_accuracy")),
                rejected=int(row.get("rejected") or 0),  # type: ignore[call-overload]
                epsilon=_epsilon(row),
            )
        )
    return points


def _accuracy(value: object) -> float | None:
    """An accuracy in [0, 1], or None for anything else (a tampered or broken row)."""
    number = _number(value)
    return number if number is not None and 0.0 <= number <= 1.0 else None


def _epsilon(row: Mapping[str, object]) -> float | None:
    """The epsilon a round row records (as a column or a stored metric), or None."""
    if EPSILON_KEY in row:
        value = row[EPSILON_KEY]
    else:
        try:
            metrics = json.loads(str(row.get("metrics_json") or "{}"))
        except (ValueError, RecursionError):
            return None
        value = metrics.get(EPSILON_KEY) if isinstance(metrics, dict) else None
    epsilon = _number(value, allow_inf=True)
    return epsilon if epsilon is not None and epsilon >= 0 else None


def _number(value: object, allow_inf: bool = False) -> float | None:
    return stored_number(value, allow_inf=allow_inf)


# ---------------------------------------------------------------- numbers
def differing_keys(configs: Sequence[Mapping[str, object]]) -> list[str]:
    """Config keys whose values differ between ``configs``: strategy first, seed last."""
    keys = set().union(*configs) - NOT_COMPARED_KEYS if configs else set()
    differing = {key for key in keys if len({show_value(c.get(key)) for c in configs}) > 1}
    return sorted(differing, key=lambda key: (key != STRATEGY_KEY, key == SEED_KEY, key))


def time_to_target(
    points: Sequence[RoundPoint], target: float
) -> tuple[int, float | None] | tuple[None, None]:
    """The first round whose central accuracy reached ``target``, and the wall time then."""
    for point in points:
        if point.central_accuracy is not None and point.central_accuracy >= target:
            return point.round, point.elapsed_s
    return None, None


def summarize_run(
    record: RunRecord, keys: Sequence[str], target: float | None
) -> dict[str, object]:
    """One run's row of the comparison (JSON-ready, numbers unrounded)."""
    accuracies = [p.central_accuracy for p in record.points if p.central_accuracy is not None]
    epsilons = [p.epsilon for p in record.points if p.epsilon is not None]
    reached_round, reached_s = (
        (None, None) if target is None else time_to_target(record.points, target)
    )
    last = record.points[-1] if record.points else None
    return {
        "run_name": record.name,
        "state": record.state,
        "strategy": record.config.get(STRATEGY_KEY),
        "differs": {key: record.config.get(key) for key in keys},
        "rounds": last.round if last else 0,
        "num_rounds": record.num_rounds,
        "final_accuracy": last.central_accuracy if last else None,
        "best_accuracy": max(accuracies, default=None),
        "target_round": reached_round,
        "target_time_s": reached_s,
        "wall_time_s": last.elapsed_s if last else 0.0,
        "rejected": sum(p.rejected for p in record.points),
        "epsilon": epsilons[-1] if epsilons else None,
        "epsilon_text": format_number(epsilons[-1], 2) if epsilons else "-",
    }


def seed_summaries(
    runs: Sequence[Mapping[str, object]], keys: Sequence[str]
) -> list[dict[str, object]]:
    """Mean and sample standard deviation over seeds, per combination of the other keys.

    Empty unless ``seed`` is one of the differing ``keys`` and some combination
    has more than one run.
    """
    if SEED_KEY not in keys:
        return []
    others = [key for key in keys if key != SEED_KEY]
    groups: dict[str, list[Mapping[str, object]]] = {}
    for run in runs:
        differs = run["differs"]
        label = label_of(differs, others) or "all runs"  # type: ignore[arg-type]
        groups.setdefault(label, []).append(run)
    if all(len(group) == 1 for group in groups.values()):
        return []
    return [_seed_summary(label, group) for label, group in groups.items()]


def _seed_summary(label: str, group: Sequence[Mapping[str, object]]) -> dict[str, object]:
    summary: dict[str, object] = {"label": label, "runs": len(group)}
    for key in ("final_accuracy", "best_accuracy", "target_time_s", "wall_time_s"):
        values = [float(run[key]) for run in group if run[key] is not None]  # type: ignore[arg-type]
        summary[key] = mean_std(values)
    summary["reached_target"] = sum(run["target_round"] is not None for run in group)
    return summary


def mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    """``{"mean", "std", "n"}``; std is the sample one (None for fewer than two values).

    Values that are not finite are left out (``n`` counts the others); a mean or
    std that would overflow is None rather than an error.
    """
    kept = [float(value) for value in values if math.isfinite(value)]
    return {
        "mean": _finite_or_none(statistics.fmean, kept) if kept else None,
        "std": _finite_or_none(statistics.stdev, kept) if len(kept) > 1 else None,
        "n": len(kept),
    }


def _finite_or_none(statistic: Callable[[list[float]], float], values: list[float]) -> float | None:
    try:
        result = statistic(values)
    except (ArithmeticError, ValueError, AttributeError):  # fsum's or stdev's overflow
        return None
    return result if math.isfinite(result) else None


def label_of(differs: Mapping[str, object], keys: Sequence[str]) -> str:
    """``strategy=median seed=1``: the run's values of ``keys``."""
    return " ".join(f"{key}={show_value(differs.get(key))}" for key in keys)


def compare_records(records: Sequence[RunRecord], target: float | None = None) -> dict[str, object]:
    """The comparison of ``records``: keys that differ, one row a run, summaries over seeds."""
    keys = differing_keys([record.config for record in records])
    runs = [summarize_run(record, keys, target) for record in records]
    labels = [label_of(run["differs"], keys) for run in runs]  # type: ignore[arg-type]
    unique = len(set(labels)) == len(labels) and all(labels)
    for run, record, label in zip(runs, records, labels, strict=True):
        run["label"] = printable(label if unique else record.name)
        run["curve"] = {
            "round": [p.round for p in record.points],
            "elapsed_s": [p.elapsed_s for p in record.points],
            "central_accuracy": [p.central_accuracy for p in record.points],
        }
    return {
        "target": target,
        "differing_keys": keys,
        "runs": runs,
        "over_seeds": seed_summaries(runs, keys),
    }


def compare_run_dirs(run_dirs: Sequence[Path], target: float | None = None) -> dict[str, object]:
    """:func:`compare_records` of the runs in ``run_dirs``.

    Raises
    ------
    RunStoreError
        If a run cannot be read (one line, naming the run and the fix).
    """
    now = time.time()
    return compare_records([read_run_record(run_dir, now) for run_dir in run_dirs], target)


# ------------------------------------------------------------------ values shown
def printable(text: str) -> str:
    """``text``, or its Python literal when it holds a character that is not printable.

    A run name with a bidi control (U+202E), a zero-width or a
    control character then cannot reorder or hide what a table shows.
    """
    return text if text.isprintable() else repr(text)


def format_number(value: object, digits: int = 4) -> str:
    """A number of the comparison as shown: ``0.9123``, ``inf``, ``1.234e+07``, ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.{digits}g}"
    return str(value)


def show_value(value: object) -> str:
    """A config value as the user typed it: ``median``, ``0.05``, ``true``, ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)
