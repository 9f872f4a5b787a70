"""Read-side JSON views of run directories for the dashboard; nothing here writes.

Every way in goes through :func:`find_run`, which admits only the name of a run
directory listed directly under the runs directory: no separators, no ``..``,
no link out of it. Every read of a run goes through :func:`read_run`: a run whose
``run.db`` is truncated, random, empty, of another schema or half-filled, or holds
values of the wrong kind, is ``unreadable`` with a one-line reason, never an error
of the dashboard itself.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from server.record.compare import compare_records, read_run_record, validate_run_names
from server.record.lifecycle import InvalidTransitionError
from server.record.privacy_report import format_epsilon, round_epsilon
from server.record.runs import RunNotFoundError, list_run_dirs, resolve_run_dir, run_status
from server.record.store import RunStore, RunStoreError
from task.names import RunNameError as RunNameError  # re-exported for server.ui.dashboard.app
from task.names import validate_run_name

T = TypeVar("T")
EVENT_LIMIT = 100
UNREADABLE = "unreadable"
# What reading a damaged or foreign run.db can raise, from SQLite or from the
# values it holds (text where a number belongs, a missing column, a huge number).
READ_ERRORS = (
    RunStoreError,
    sqlite3.Error,
    OSError,
    ValueError,
    TypeError,
    LookupError,
    ArithmeticError,
    RecursionError,
)
REASON_MAX_CHARS = 300
REJECTION_LIMIT = 50
# Config keys shown under the run's name, in this order.
CONFIG_SUMMARY_KEYS = ("strategy", "dataset", "model", "partitioner", "local-epochs", "seed")
ROUND_COLUMNS = (
    "round",
    "ended_at",
    "duration_s",
    "sampled",
    "accepted",
    "rejected",
    "failed",
    "updated",
    "train_loss",
    "central_loss",
    "central_accuracy",
    "federated_loss",
    "federated_accuracy",
    "note",
)
EVENT_COLUMNS = ("id", "at", "kind", "message")
REJECTION_COLUMNS = ("round", "node_id", "kind", "reason", "at")
NODE_COLUMNS = (
    "node_id",
    "partition_id",
    "device",
    "num_examples",
    "rounds_joined",
    "failures",
    "rejected",
    "weight",
    "last_seen",
    "last_error",
)


class RunUnreadableError(RuntimeError):
    """A run whose ``run.db`` cannot be read; the message is one line with the reason."""


def read_run(read: Callable[[Path], T], run_dir: Path) -> T:
    """``read(run_dir)``, any failure to read the run's store raised as one error.

    Raises
    ------
    RunUnreadableError
        If ``read`` raised one of :data:`READ_ERRORS`; the message names the run
        and the reason, on one line. A refusal (``InvalidTransitionError``) and
        ``RunNotFoundError`` pass through as they are.
    """
    try:
        return read(run_dir)
    except (InvalidTransitionError, RunNotFoundError):
        raise  # a refusal or a missing run, not a damaged one
    except READ_ERRORS as error:
        prefix, why = f"run {run_dir.name!r} is unreadable: ", reason(error)
        message = why if why.startswith(prefix) else prefix + why  # the store's own says so
        raise RunUnreadableError(message) from None


def reason(error: BaseException) -> str:
    """The first line of ``error``'s message (its type when it has none), shortened."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= REASON_MAX_CHARS else text[: REASON_MAX_CHARS - 1] + "…"


def contained_run_dirs(runs_dir: Path) -> list[Path]:
    """Run directories that really live in ``runs_dir`` (a link out of it is left out)."""
    root = runs_dir.resolve()
    return [d for d in list_run_dirs(runs_dir) if d.resolve().parent == root]


def find_run(runs_dir: Path, name: str) -> Path:
    """The directory of run ``name`` in ``runs_dir``.

    Raises
    ------
    RunNameError
        If ``name`` is not a plain folder name.
    RunNotFoundError
        If no such run lives in ``runs_dir``.
    """
    run_dir = resolve_run_dir(runs_dir, validate_run_name(name))
    if run_dir.resolve().parent != runs_dir.resolve():
        raise RunNotFoundError(f"no run {name!r} in {runs_dir}")
    return run_dir


def list_runs(runs_dir: Path) -> dict[str, object]:
    """Every run's summary for the runs page, newest first."""
    now = time.time()
    runs = []
    for run_dir in contained_run_dirs(runs_dir):
        try:
            runs.append(read_run(lambda d: _summary(d, now), run_dir))
        except RunUnreadableError as error:
            runs.append({"run_name": run_dir.name, "state": UNREADABLE, "message": str(error)})
    runs.sort(key=lambda run: run.get("created_at") or 0.0, reverse=True)  # type: ignore[arg-type, return-value]
    return {"runs_dir": str(runs_dir), "now": now, "runs": runs}


def _summary(run_dir: Path, now: float) -> dict[str, object]:
    status = run_status(run_dir)
    created_at = float(status["created_at"])  # type: ignore[arg-type]
    metrics = status["metrics"] if isinstance(status["metrics"], dict) else {}
    keys = (
        "run_name",  # the folder's name: links and commands use it
        "stored_run_name",  # what run.db records; differs in a copied or renamed folder
        "state",
        "current_round",
        "num_rounds",
        "progress",
        "best_accuracy",
    )
    summary = {key: status[key] for key in keys}
    summary.update(
        accuracy=metrics.get("central_accuracy"),
        nodes=status["nodes"],
        created_at=0.0 if math.isnan(created_at) else created_at,  # NaN sorts nowhere
        age_s=round(now - created_at, 1),
        heartbeat_age_s=status["heartbeat_age_s"],
        eta_s=status["eta_s"],
        message=status["message"],
    )
    return summary


def run_detail(run_dir: Path) -> dict[str, object]:
    """Everything the run page shows: status, config, rounds, nodes, rejections, events."""
    status = run_status(run_dir)
    store = RunStore(run_dir, readonly=True)
    try:
        run = store.run_row()
        rounds = store.rounds()
        nodes = store.nodes()
        events = store.events(EVENT_LIMIT)
        pending = store.pending_commands()
        rejected = store.rejections(REJECTION_LIMIT)
    finally:
        store.close()
    return {
        "now": time.time(),
        "status": status,
        "config": _config_summary(str(run["config_json"])),
        "rounds": [round_view(row) for row in rounds],
        "nodes": [{key: node[key] for key in NODE_COLUMNS} for node in nodes],
        "rejections": [{key: row[key] for key in REJECTION_COLUMNS} for row in rejected],
        "events": [{key: event[key] for key in EVENT_COLUMNS} for event in events],
        "pending_commands": [
            {key: command[key] for key in ("command", "argument", "created_at")}
            for command in pending
        ],
    }


def compare_view(runs_dir: Path, names: list[str], target: float | None) -> dict[str, object]:
    """The comparison of runs ``names`` of ``runs_dir``, as ``fedcoord compare --json`` prints it.

    Raises
    ------
    server.record.compare.CompareError
        For fewer than two runs, more than 20, or one named twice.
    RunNameError, RunNotFoundError, RunUnreadableError
        As :func:`find_run` and :func:`read_run` do, for the first such run.
    """
    run_dirs = [find_run(runs_dir, name) for name in validate_run_names(names)]
    now = time.time()
    records = [read_run(lambda d: read_run_record(d, now), run_dir) for run_dir in run_dirs]
    return compare_records(records, target)


def round_rows(run_dir: Path) -> tuple[list[dict[str, object]], int]:
    """The round rows (chart columns) and the run's target number of rounds."""
    store = RunStore(run_dir, readonly=True)
    try:
        rows = store.rounds()
        num_rounds = int(store.run_row()["num_rounds"])  # type: ignore[call-overload]
    finally:
        store.close()
    return [round_view(row) for row in rows], num_rounds


def round_view(row: dict[str, object]) -> dict[str, object]:
    """A round row's shown columns, with its epsilon (``epsilon_text``: ``inf`` as text)."""
    epsilon = round_epsilon(row)
    view = {key: row[key] for key in ROUND_COLUMNS}
    return {**view, "epsilon": epsilon, "epsilon_text": format_epsilon(epsilon)}


def _config_summary(config_json: str) -> dict[str, object]:
    """The summary keys of the stored config that hold plain values; {} if it is no object."""
    try:
        config = json.loads(config_json)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(config, dict):
        return {}
    plain = (str, int, float, bool)
    return {key: config[key] for key in CONFIG_SUMMARY_KEYS if isinstance(config.get(key), plain)}
