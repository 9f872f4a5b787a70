"""Read-side JSON views of run directories for the dashboard; nothing here writes.

Every way in goes through :func:`find_run`, which admits only the name of a run
directory listed directly under the runs directory: no separators, no ``..``,
no link out of it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from server.runs import RunNotFoundError, list_run_dirs, resolve_run_dir, run_status
from server.store import DB_NAME, RunStore, RunStoreError, connect

EVENT_LIMIT = 100
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


class RunNameError(ValueError):
    """A run name that is not a plain folder name (separators, ``..``, control chars)."""


def validate_run_name(name: str) -> str:
    """Return ``name`` if it can only name a folder directly under the runs directory.

    Raises
    ------
    RunNameError
        If it is empty, ``.``, contains ``..``, a path separator or a control character.
    """
    if (
        not name
        or name == "."
        or ".." in name
        or "/" in name
        or "\\" in name
        or any(ord(char) < 32 or ord(char) == 127 for char in name)
    ):
        raise RunNameError(f"invalid run name {name!r}: not a plain folder name")
    return name


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
    runs = [_summary(run_dir, now) for run_dir in contained_run_dirs(runs_dir)]
    runs.sort(key=lambda run: float(run.get("created_at") or 0.0), reverse=True)  # type: ignore[arg-type]
    return {"runs_dir": str(runs_dir), "now": now, "runs": runs}


def _summary(run_dir: Path, now: float) -> dict[str, object]:
    try:
        status = run_status(run_dir)
    except (RunStoreError, OSError, sqlite3.Error) as error:
        return {"run_name": run_dir.name, "state": "unreadable", "message": str(error)}
    metrics = status["metrics"] if isinstance(status["metrics"], dict) else {}
    keys = ("run_name", "state", "current_round", "num_rounds", "progress", "best_accuracy")
    summary = {key: status[key] for key in keys}
    summary.update(
        accuracy=metrics.get("central_accuracy"),
        nodes=status["nodes"],
        created_at=status["created_at"],
        age_s=round(now - float(status["created_at"]), 1),  # type: ignore[arg-type]
        heartbeat_age_s=status["heartbeat_age_s"],
        eta_s=status["eta_s"],
        message=status["message"],
    )
    return summary


def run_detail(run_dir: Path) -> dict[str, object]:
    """Everything the run page shows: status, config, rounds, nodes, rejections, events."""
    status = run_status(run_dir)
    store = RunStore(run_dir)
    try:
        run = store.run_row()
        rounds = store.rounds()
        nodes = store.nodes()
        events = store.events(EVENT_LIMIT)
        pending = store.pending_commands()
    finally:
        store.close()
    return {
        "now": time.time(),
        "status": status,
        "config": _config_summary(str(run["config_json"])),
        "rounds": [{key: row[key] for key in ROUND_COLUMNS} for row in rounds],
        "nodes": [{key: node[key] for key in NODE_COLUMNS} for node in nodes],
        "rejections": rejections(run_dir, REJECTION_LIMIT),
        "events": [{key: event[key] for key in EVENT_COLUMNS} for event in events],
        "pending_commands": [
            {key: command[key] for key in ("command", "argument", "created_at")}
            for command in pending
        ],
    }


def rejections(run_dir: Path, limit: int) -> list[dict[str, object]]:
    """The latest rejected updates and failures with their reasons, newest first."""
    db = connect(run_dir / DB_NAME)
    try:
        rows = db.execute(
            "SELECT round, node_id, kind, reason, at FROM rejections ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
    finally:
        db.close()
    return [dict(row) for row in rows]


def round_rows(run_dir: Path) -> tuple[list[dict[str, object]], int]:
    """The round rows (chart columns) and the run's target number of rounds."""
    store = RunStore(run_dir)
    try:
        rows = store.rounds()
        num_rounds = int(store.run_row()["num_rounds"])  # type: ignore[call-overload]
    finally:
        store.close()
    return [{key: row[key] for key in ROUND_COLUMNS} for row in rows], num_rounds


def _config_summary(config_json: str) -> dict[str, object]:
    try:
        config = json.loads(config_json)
    except json.JSONDecodeError:
        return {}
    if not isinstance(config, dict):
        return {}
    return {key: config[key] for key in CONFIG_SUMMARY_KEYS if key in config}
