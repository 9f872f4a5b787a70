"""Read-side views of run directories, shared by the CLI (and any other reader)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from server.record.privacy_report import privacy_summary
from server.record.schema import int_value, real_or_none, real_value
from server.record.store import DB_NAME, RunStore, RunStoreError
from task.config import fedcoord_home
from task.names import RunNameError, find_run_dir_problem

FINAL_STATES = ("stopped", "completed", "failed")
STALE_HEARTBEAT_S = 15.0
# The coordinator's event for a roll-call answer naming a partition another node holds.
ROLL_CALL_REFUSED = "roll-call-refused"
# ... and for a partition passed from a node that left to a new one.
ROLL_CALL_TRANSFERRED = "roll-call-transferred"


class RunNotFoundError(LookupError):
    """No run of that name (or no run at all) in the runs directory."""


def default_runs_dir() -> Path:
    """``$FEDCOORD_HOME/runs``, the runs directory when none is given."""
    return fedcoord_home() / "runs"


def list_run_dirs(runs_dir: Path) -> list[Path]:
    """Run directories of ``runs_dir``, by name: folders holding a run.db file.

    A folder whose name is not a valid run name, that is a link out of the runs
    folder, or whose run.db is a link or not a regular file is left out.
    """
    if not runs_dir.is_dir():
        return []
    return sorted(
        folder
        for folder in runs_dir.iterdir()
        if find_run_dir_problem(runs_dir, folder.name) is None
        and not (folder / DB_NAME).is_symlink()
        and (folder / DB_NAME).is_file()
    )


def resolve_run_dir(runs_dir: Path, run_name: str | None) -> Path:
    """The directory of ``run_name``, or of the newest run when it is None.

    Raises
    ------
    RunNameError
        If ``run_name`` is not a valid run name, or names a link out of the runs folder.
    RunNotFoundError
        If the run does not exist; the message lists the runs that do.
    """
    runs = list_run_dirs(runs_dir)
    if run_name is None:
        if not runs:
            raise RunNotFoundError(f"no runs in {runs_dir}")
        return newest(runs)
    problem = find_run_dir_problem(runs_dir, run_name)
    if problem is not None:
        raise RunNameError(problem)
    candidate = runs_dir / run_name
    if candidate not in runs:
        names = ", ".join(d.name for d in runs[:20]) or "none"
        more = f" and {len(runs) - 20} more" if len(runs) > 20 else ""
        raise RunNotFoundError(f"no run {run_name!r} in {runs_dir}; runs: {names}{more}")
    return candidate


def newest(runs: list[Path]) -> Path:
    """The run created last, by the creation time stored in its run.db (unreadable: oldest)."""

    def created(run_dir: Path) -> float:
        try:
            store = RunStore(run_dir, readonly=True)
        except RunStoreError:
            return float("-inf")
        try:
            created_at = real_value(store.run_row(), "created_at")
        except RunStoreError:
            return float("-inf")
        finally:
            store.close()
        return created_at if math.isfinite(created_at) else float("-inf")

    return max(runs, key=created)


def effective_state(state: str, heartbeat_at: float | None, now: float) -> str:
    """``interrupted`` for a non-final state whose heartbeat is stale, else the state."""
    if state in FINAL_STATES:
        return state
    if heartbeat_at is None or now - heartbeat_at > STALE_HEARTBEAT_S:
        return "interrupted"
    return state


def run_status(run_dir: Path) -> dict[str, object]:
    """The status of one run as a JSON-ready dict (SPEC ``status --json`` fields).

    Raises
    ------
    RunStoreError
        If its run.db cannot be read (:class:`server.record.store.CorruptRunError`: one line).
    """
    store = RunStore(run_dir, readonly=True)
    try:
        run = store.run_row()
        rounds = store.rounds()
        nodes = store.nodes()
        refused = store.events_of_kind(ROLL_CALL_REFUSED, limit=5)
    finally:
        store.close()
    now = time.time()
    heartbeat_at = real_or_none(run, "heartbeat_at")
    completed = [r for r in rounds if int_value(r, "round") > 0]
    num_rounds = int_value(run, "num_rounds")
    current = int_value(run, "current_round")
    latest = rounds[-1] if rounds else None
    state = effective_state(str(run["state"]), heartbeat_at, now)
    accuracies = [real_or_none(r, "central_accuracy") for r in rounds]
    return {
        "run_name": run_dir.name,  # what every command takes
        "stored_run_name": run["run_name"],  # what run.db records; differs in a copied folder
        "state": state,
        "stored_state": run["state"],
        "current_round": current,
        "num_rounds": num_rounds,
        "mode": stored_config(run["config_json"]).get("mode", "sync"),
        "step": run_step(run["config_json"]),
        "progress": min(1.0, current / num_rounds) if num_rounds else 0.0,
        "phase": run["phase"],
        "replies_received": run["replies_received"],
        "replies_expected": run["replies_expected"],
        "metrics": _round_metrics(latest),
        "best_accuracy": max((a for a in accuracies if a is not None), default=None),
        "nodes": len(nodes),
        "roll_call_refused": [str(event["message"]) for event in refused],
        "heartbeat_age_s": None if heartbeat_at is None else round(now - heartbeat_at, 3),
        "server_pid": run["server_pid"],
        "flwr_run_id": run["flwr_run_id"],
        "eta_s": _eta(completed, num_rounds - current, state),
        "message": run["message"],
        "run_dir": str(run_dir),
        "created_at": run["created_at"],
        "training": _training(run["config_json"]),
        "privacy": privacy_summary(stored_config(run["config_json"]), rounds),
    }


def name_note(status: dict[str, object]) -> str:
    """``holds run 'a'`` for a run folder whose run.db records another run name, else ''."""
    stored = status.get("stored_run_name")
    if stored is None or stored == status["run_name"]:
        return ""
    return f"holds run {stored!r}"


def stored_config(config_json: object) -> dict[str, object]:
    """The run's stored config; {} if it cannot be read (checked elsewhere, not ours to fail)."""
    try:
        config = json.loads(str(config_json))
    except (ValueError, RecursionError):
        return {}
    return config if isinstance(config, dict) else {}


def run_step(config_json: object) -> str:
    """What the run counts: ``version`` (``mode='async'``, FedBuff) or ``round``."""
    return "version" if stored_config(config_json).get("mode") == "async" else "round"


def _training(config_json: object) -> dict[str, object]:
    """The run's local training keys, which took the dataset's default, and evaluation."""
    config = stored_config(config_json)
    if not config:
        return {}
    training: dict[str, object] = {
        key: config.get(key) for key in ("dataset", "local-epochs", "batch-size", "lr", "momentum")
    }
    defaults = config.get("dataset-defaults")
    training["dataset-defaults"] = [k for k in str(defaults).split(",") if k] if defaults else []
    training["federated-evaluation"] = _evaluation_summary(config)
    return training


def _evaluation_summary(config: dict[str, object]) -> str:
    """``every round, 100% of nodes`` or why there is none (``off: local-test-fraction=0``)."""
    if config.get("local-test-fraction") == 0:
        return "off: local-test-fraction=0, every example trains"
    fraction = config.get("fraction-evaluate", 1.0)
    if fraction == 0:
        return "off: fraction-evaluate=0"
    every = config.get("evaluate-every", 1)
    when = "every round" if every == 1 else f"every {every} rounds and the last"
    share = f"{100 * float(fraction):.0f}%" if isinstance(fraction, int | float) else "?"
    return f"{when}, {share} of nodes"


def _round_metrics(row: dict[str, object] | None) -> dict[str, object]:
    if row is None:
        return {}
    keys = (
        "round",
        "train_loss",
        "central_loss",
        "central_accuracy",
        "federated_loss",
        "federated_accuracy",
        "accepted",
        "rejected",
        "failed",
        "duration_s",
    )
    return {key: row[key] for key in keys}


def _eta(completed: list[dict[str, object]], remaining: int, state: str) -> float | None:
    if state != "running" or not completed or remaining <= 0:
        return None if remaining > 0 else 0.0
    recent = completed[-5:]
    mean = sum(real_value(r, "duration_s") for r in recent) / len(recent)
    return round(mean * remaining, 1)
