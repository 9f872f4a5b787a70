"""ServerApp entry: parse the config, open the run directory, run the coordinator."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from logging import ERROR, INFO

from flwr.app import Context
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import RunNotRunningException

from server import object_pull
from server.async_rounds import AsyncCoordinator
from server.control import StopRequestedError
from server.coordinator import Coordinator, EvaluateFn, NamedArrays, NodeShortageError
from server.export.tracking import start_tracking
from server.preflight import (
    check_budget_covers_a_round,
    check_resumable_exists,
    check_run_name_free,
)
from server.record import lifecycle
from server.record.checkpoints import CheckpointError
from server.record.entries import check_run_entries
from server.record.runs import effective_state
from server.record.store import RunStore, RunStoreError
from server.record.verify import load_verified_checkpoint
from strategies.accounted import PrivacyBudgetReachedError, accounted
from strategies.protocol import RoundStrategy
from strategies.registry import build_strategy
from task.config import (
    ConfigError,
    RunConfig,
    config_to_dict,
    make_run_name,
    parse_run_config,
)
from task.datasets import DatasetSplits, DatasetUnavailableError, load_dataset
from task.models import build_model
from task.names import find_run_dir_problem
from task.training import load_numpy_into, model_to_numpy, resolve_device
from task.training import test as evaluate_model

app = ServerApp()

DEBUG_ENV = "FEDCOORD_DEBUG"


class NoRoundUpdatedError(RuntimeError):
    """Every round of the run kept the model: no node's update was accepted."""


def check_some_round_updated(store: RunStore, first_round: int) -> None:
    """Fail a run none of whose rounds changed the model.

    Raises
    ------
    NoRoundUpdatedError
        Naming the last round's reason and where to read each node's error.
    """
    ran = [row for row in store.rounds() if int(row["round"]) >= first_round]  # type: ignore[call-overload]
    if ran and not any(row["updated"] for row in ran):
        raise NoRoundUpdatedError(
            f"no round updated the model (round {ran[-1]['round']}: {ran[-1]['note']}); "
            f"see each node's error with: fedcoord nodes {store.run_dir.name}"
        )


# Errors whose message already names the fix: logged as one line, without a traceback.
ONE_LINE_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DatasetUnavailableError,
    NodeShortageError,
    NoRoundUpdatedError,
    RunStoreError,
)


class OneLineErrorFilter(logging.Filter):
    """Turn Flower's "ServerApp raised an exception" traceback into one ERROR line.

    Flower logs any exception that leaves the ServerApp with its traceback, and
    marks the run failed. For the errors a user fixes by changing the config or
    starting nodes, that traceback hides the one line that matters.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Strip the traceback of a record that carries one of ``ONE_LINE_ERRORS``."""
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ONE_LINE_ERRORS):
            record.msg, record.args = "fedcoord: %s", (str(error),)
            record.exc_info, record.exc_text = None, None
        return True


def install_one_line_errors() -> None:
    """Install :class:`OneLineErrorFilter` once, unless ``FEDCOORD_DEBUG=1`` asks for tracebacks."""
    if os.environ.get(DEBUG_ENV, "") in ("1", "true"):
        return
    if not any(isinstance(f, OneLineErrorFilter) for f in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(OneLineErrorFilter())


@dataclass
class StartPoint:
    """Where a run starts: the global arrays and the first round to run."""

    arrays: NamedArrays
    first_round: int


def make_central_evaluate(config: RunConfig, data: DatasetSplits) -> EvaluateFn:
    """Return ``evaluate_fn(arrays) -> (loss, accuracy)`` on the held-out test set.

    Raises
    ------
    ConfigError
        When ``device`` is not available here (one line, like every config error).
    """
    try:
        device = resolve_device(config.device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    model = build_model(config.model, data.input_shape, data.num_classes, config.seed).to(device)

    def evaluate(arrays: NamedArrays) -> tuple[float, float]:
        load_numpy_into(model, arrays)
        result = evaluate_model(
            model, data.test, batch_size=max(256, config.batch_size), device=device
        )
        return result.loss, result.accuracy

    return evaluate


def open_new_run(config: RunConfig, run_name: str) -> RunStore:
    """Create the run directory of a fresh run; refuse to overwrite an existing one."""
    run_dir = config.resolved_runs_dir / run_name
    check_run_name_free(config, run_name)
    stored = {**config_to_dict(config), "dataset-defaults": ",".join(config.dataset_defaults)}
    return RunStore.create(run_dir, run_name, stored, config.num_server_rounds)


def open_resumed_run(config: RunConfig) -> RunStore:
    """Open the run named by ``run-name`` for ``resume=true``, checking it can go on."""
    run_dir = config.resolved_runs_dir / config.run_name
    link_problem = find_run_dir_problem(config.resolved_runs_dir, config.run_name)
    if link_problem is not None:
        raise ConfigError(f"resume=true: {link_problem}")
    check_resumable_exists(config)
    check_run_entries(run_dir)
    try:
        store = RunStore(run_dir)
        run = store.run_row()
    except RunStoreError as error:  # damaged, or recorded by an older fedcoord
        raise ConfigError(f"resume=true: {error}") from None
    state = effective_state(str(run["state"]), run["heartbeat_at"], time.time())  # type: ignore[arg-type]
    if state in (lifecycle.RUNNING, lifecycle.PAUSED, lifecycle.STOPPING):
        raise ConfigError(
            f"run {config.run_name!r} is {state} in server pid {run['server_pid']}; "
            "stop it first (fedcoord stop) or wait until its heartbeat is stale"
        )
    if state == lifecycle.COMPLETED and int(run["current_round"]) >= config.num_server_rounds:  # type: ignore[call-overload]
        raise ConfigError(
            f"run {config.run_name!r} already completed {run['current_round']} rounds; "
            "raise num-server-rounds to continue it"
        )
    dropped = store.drop_pending_commands()
    if dropped:
        store.add_event(
            "dropped",
            f"{len(dropped)} command(s) queued for the previous server dropped on resume: "
            + ", ".join(dropped[:10]),
        )
    return store


def restore_start_point(
    store: RunStore, config: RunConfig, strategy: RoundStrategy
) -> StartPoint | None:
    """Load the latest checkpoint into ``strategy``; None if there is none.

    The checkpoint must be the one the run's hash chain records (file and model
    hash), whatever the checkpoints table says; otherwise resume is refused.
    """
    for leftover in (store.run_dir / "checkpoints").glob(".tmp-*"):
        leftover.unlink()  # a save cut short by a crash; the renamed files are whole
    try:
        checkpoint = load_verified_checkpoint(store)
    except CheckpointError as error:
        raise ConfigError(f"resume: {error}") from None
    if checkpoint is None:
        store.truncate_after(-1)
        return None
    for key in ("model", "dataset"):
        saved = checkpoint.metadata.get(key)
        if saved != getattr(config, key):
            raise ConfigError(
                f"resume: the checkpoint was trained with {key}={saved!r}, "
                f"this run asks for {key}={getattr(config, key)!r}; they must match"
            )
    store.truncate_after(checkpoint.server_round)
    strategy.load_state_dict(checkpoint.strategy_state)
    return StartPoint(checkpoint.arrays, checkpoint.server_round + 1)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) one federated training run under the coordinator."""
    install_one_line_errors()
    config = parse_run_config(context.run_config)
    object_pull.install()
    check_budget_covers_a_round(config, build_strategy(config), None)  # plain flwr run too
    strategy = accounted(build_strategy(config), config)  # with its privacy ledger
    run_name = config.run_name or make_run_name()
    store = open_resumed_run(config) if config.resume else open_new_run(config, run_name)
    store.update_run(
        state=lifecycle.RUNNING,
        num_rounds=config.num_server_rounds,
        server_pid=os.getpid(),
        flwr_run_id=str(grid.run.run_id),
        heartbeat_at=time.time(),
        message="",
    )
    log(
        INFO,
        "fedcoord run %s: %s; %s on %s, %s",
        run_name,
        store.run_dir,
        config.strategy,
        config.dataset,
        config.training_summary,
    )
    heartbeat = store.start_heartbeat()
    tracker = start_tracking(config, store.run_dir)
    try:
        outcome = run_training(grid, config, store, strategy)
    finally:
        heartbeat.set()
        if tracker is not None:
            tracker.finish()
    store.close()
    log(INFO, "%s", outcome)


def run_training(grid: Grid, config: RunConfig, store: RunStore, strategy: RoundStrategy) -> str:
    """Run the rounds and record how the run ended; return the closing log line."""
    budget = ""  # why a privacy budget ended the run early
    try:
        data = load_dataset(config.dataset, config.resolved_data_dir, config.seed)
        start = restore_start_point(store, config, strategy) if config.resume else None
        if start is None:
            model = build_model(config.model, data.input_shape, data.num_classes, config.seed)
            start = StartPoint(model_to_numpy(model), 1)
        else:
            store.add_event(
                "resumed", f"resumed from the checkpoint of round {start.first_round - 1}"
            )
            log(INFO, "resuming from the checkpoint of round %d", start.first_round - 1)
        coordinator_class = AsyncCoordinator if config.mode == "async" else Coordinator
        coordinator = coordinator_class(
            grid,
            strategy,
            store,
            config,
            make_central_evaluate(config, data),  # type: ignore[arg-type]
        )
        coordinator.run(start.arrays, start.first_round)
        check_some_round_updated(store, start.first_round)
    except PrivacyBudgetReachedError as error:  # the run is complete: no more can be spent
        budget = str(error)
        store.add_event("privacy-budget", budget)
        log(INFO, "%s", budget)
    except (StopRequestedError, RunNotRunningException, KeyboardInterrupt, SystemExit) as error:
        reason = "flwr stop" if isinstance(error, RunNotRunningException) else str(error)
        store.update_run(state=lifecycle.STOPPED, phase="stopped", message=reason)
        store.add_event("stopped", reason)
        return f"run stopped ({reason}) after round {store.run_row()['current_round']}"
    except BaseException as error:
        store.update_run(state=lifecycle.FAILED, message=f"{type(error).__name__}: {error}")
        store.add_event("failed", f"{type(error).__name__}: {error}")
        if not isinstance(error, ONE_LINE_ERRORS):
            log(ERROR, "run failed: %s", error)
        raise
    store.update_run(state=lifecycle.COMPLETED, phase="done", message=budget)
    rounds = store.rounds()
    accuracy = float(rounds[-1]["central_accuracy"]) if rounds else float("nan")  # type: ignore[arg-type]
    store.add_event("completed", f"final accuracy {accuracy:.4f}")
    return f"final accuracy: {accuracy:.4f}"
