"""One way to put a round on record: checkpoint, hash, chain, prune and report it.

Both round loops end a round here: the synchronous coordinator after each
round, the asynchronous one after each published version (recorded as round
k). The checkpoint is written first, so the round row can chain the SHA-256 of
its file and the hash of the model it holds (both from
:func:`~server.record.checkpoints.save_checkpoint`); then the row goes to the
store, the checkpoint files beyond the last few and the best are pruned, and
the round is told to the event log and the server log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO

import numpy as np
from flwr.common.logger import log

from server.record.checkpoints import checkpoint_path, files_to_prune, model_hash, save_checkpoint
from server.record.schema import int_value, real_or_none
from server.record.store import RoundRecord, RunStore
from task.config import RunConfig

DescribeFn = Callable[[RoundRecord], tuple[str, str]]
"""A recorded round -> (its line in the event log, its line in the server log)."""


@dataclass(frozen=True)
class RoundResult:
    """What one completed round (or async version) produced, before it is on record."""

    server_round: int
    started_at: float  # time.time()
    sampled: int
    accepted: int
    rejected: int
    failed: int
    updated: bool
    metrics: Mapping[str, float]  # has "central-accuracy"
    arrays: Mapping[str, np.ndarray]  # the global model after the round
    strategy_state: Mapping[str, np.ndarray]
    note: str = ""


def record_round_result(
    store: RunStore, config: RunConfig, result: RoundResult, describe: DescribeFn
) -> RoundRecord:
    """Checkpoint, record (chained), prune and report one completed round.

    Parameters
    ----------
    store : RunStore
        The run's store, written to.
    config : RunConfig
        The run's configuration (what the checkpoint's metadata names).
    result : RoundResult
        The round's counts, metrics, global model and strategy state.
    describe : DescribeFn
        The round's lines for the event log and the server log.

    Returns
    -------
    RoundRecord
        The round as recorded (``ended_at`` once its checkpoint is written).
    """
    saved = save_checkpoint(
        store.run_dir,
        result.server_round,
        result.arrays,
        result.strategy_state,
        checkpoint_metadata(config, result.metrics["central-accuracy"]),
    )
    record = RoundRecord(
        round=result.server_round,
        started_at=result.started_at,
        ended_at=time.time(),
        sampled=result.sampled,
        accepted=result.accepted,
        rejected=result.rejected,
        failed=result.failed,
        updated=result.updated,
        metrics=result.metrics,
        model_hash=saved.model_hash,
        note=result.note,
    )
    store.record_round(record, checkpoint=saved)
    prune_checkpoints(store)
    event, line = describe(record)
    store.add_event("round", event)
    log(INFO, "%s", line)
    return record


def checkpoint_metadata(config: RunConfig, central_accuracy: float) -> dict[str, object]:
    """What a checkpoint says about its run: accuracy, model, dataset, strategy (and mode)."""
    metadata: dict[str, object] = {
        "central-accuracy": central_accuracy,
        "model": config.model,
        "dataset": config.dataset,
        "strategy": config.strategy,
    }
    if config.mode == "async":
        metadata["mode"] = "async"
    return metadata


def prune_checkpoints(store: RunStore) -> None:
    """Delete checkpoint files beyond the last few and the best, and their rows."""
    scored = [
        (int_value(row, "round"), real_or_none(row, "central_accuracy"))
        for row in store.checkpoints()
    ]
    for server_round in files_to_prune(scored):
        checkpoint_path(store.run_dir, server_round).unlink(missing_ok=True)
        store.forget_checkpoint(server_round)


def record_initial_evaluation(
    store: RunStore, arrays: Mapping[str, np.ndarray], loss: float, accuracy: float
) -> RoundRecord:
    """Record the initial model's central evaluation as round 0 (no checkpoint)."""
    now = time.time()
    record = RoundRecord(
        round=0,
        started_at=now,
        ended_at=now,
        sampled=0,
        accepted=0,
        rejected=0,
        failed=0,
        updated=False,
        metrics={"central-loss": loss, "central-accuracy": accuracy},
        model_hash=model_hash(arrays),
        note="initial model",
    )
    store.record_round(record)
    return record
