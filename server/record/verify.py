"""``fedcoord verify``: check a run's record against itself and its checkpoint files.

What is checked (schema 2, see :mod:`server.record.chain`):

- the chain: each round row's hash over all its columns and the previous hash,
  from the genesis hash bound to the run's name, creation time and config;
- the head: the newest row is the one the chain head records (round, hash and
  number of rows) and ``run.current_round`` agrees, so deleted newest rows show;
- each kept checkpoint: its file is the one of its round, its SHA-256 is the one
  the chained round row records (and the checkpoints table), and the model it
  holds hashes to the round row's chained model hash.

Every problem is one line: ``round R: what differs``. A schema 1 run (older
fedcoord) is checked as far as its chain goes, and the summary says what that
chain leaves out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from server.record.chain import chain_hash, legacy_chain_hash
from server.record.checkpoints import (
    CHECKPOINT_DIR,
    Checkpoint,
    CheckpointError,
    checkpoint_file_problem,
    file_sha256,
    load_checkpoint,
    model_hash,
)
from server.record.schema import LEGACY_SCHEMA_VERSION, int_value
from server.record.store import RunStore

Row = Mapping[str, object]
LEGACY_NOTE = (
    "schema 1 (older fedcoord): its chain covers only each row's model hash, round and "
    "metrics, and deleted newest rounds cannot be seen"
)


def link_of(previous: str, row: Row, schema_version: int) -> str:
    """The chain hash ``row`` should carry after ``previous``, in the store's format."""
    if schema_version == LEGACY_SCHEMA_VERSION:
        metrics_json = str(row["metrics_json"])
        model = str(row["model_hash"])
        return legacy_chain_hash(previous, model, int_value(row, "round"), metrics_json)
    return chain_hash(previous, row)


def verify_chain(rounds: Sequence[Row], genesis: str, schema_version: int) -> list[str]:
    """Problems in the chain of round rows, oldest first (empty list when intact)."""
    problems = []
    previous = genesis
    for index, row in enumerate(rounds):
        if index and row["round"] != int_value(rounds[index - 1], "round") + 1:
            problems.append(
                f"round {row['round']}: the row before it is round {rounds[index - 1]['round']} "
                "(rows in between are missing)"
            )
        if link_of(previous, row, schema_version) != row["chain_hash"]:
            problems.append(
                f"round {row['round']}: chain hash does not match its row and the one before "
                "it (a value of this row was edited, or a row before it was edited or deleted)"
            )
        previous = str(row["chain_hash"])
    return problems


def verify_head(rounds: Sequence[Row], head: Row | None, current_round: int) -> list[str]:
    """Problems binding the newest round row: the chain head and ``run.current_round``."""
    if head is None:
        return ["the chain head (newest round and hash) is missing from run.db or malformed"]
    last = rounds[-1] if rounds else None
    problems = []
    if last is None or head["round"] != last["round"] or head["hash"] != last["chain_hash"]:
        newest = "no round rows" if last is None else f"the newest row is round {last['round']}"
        problems.append(
            f"round {head['round']}: the chain head records it as the newest round, but "
            f"{newest} (newest rounds deleted, or rows edited)"
        )
    if head["rows"] != len(rounds):
        problems.append(
            f"the chain head records {head['rows']} round rows, run.db has {len(rounds)}"
        )
    expected_current = head["round"] if head["round"] is not None else 0
    if current_round != expected_current:
        problems.append(
            f"run.current_round is {current_round}, the chain head records round {expected_current}"
        )
    return problems


def verify_checkpoint(run_dir: Path, checkpoint: Row, round_row: Row | None) -> list[str]:
    """Problems of one kept checkpoint: its file, its hashes, the model it holds."""
    server_round = int_value(checkpoint, "round")
    prefix = f"round {server_round}: checkpoint"
    name_problem = checkpoint_file_problem(server_round, checkpoint["path"])
    if name_problem is not None:
        return [f"{prefix} row {name_problem}"]
    path = run_dir / CHECKPOINT_DIR / str(checkpoint["path"])
    if round_row is None:
        return [f"{prefix} {path} has no round row {server_round}"]
    if not path.is_file():
        return [f"{prefix} {path} is missing"]
    actual = file_sha256(path)
    listed, chained = checkpoint["sha256"], round_row.get("checkpoint_sha256")
    if actual != listed and actual != chained:
        return [f"{prefix} {path} is altered: sha256 {actual}, run.db records {listed}"]
    problems = []
    if actual != listed:
        problems.append(
            f"{prefix} row records sha256 {listed}, the file and its round row {actual}"
        )
    if chained is not None and actual != chained:
        problems.append(
            f"{prefix} {path} is not the file its chained round row records: sha256 {actual}, "
            f"the round row records {chained or 'none'}"
        )
    try:
        loaded = load_checkpoint(path, actual)
    except CheckpointError as error:
        return [*problems, f"{prefix} {error}"]
    recomputed = model_hash(loaded.arrays)
    if recomputed != round_row["model_hash"]:
        problems.append(
            f"{prefix} {path} holds a model with hash {recomputed}, the chained round row "
            f"records {round_row['model_hash']}"
        )
    if loaded.server_round != server_round:
        problems.append(f"{prefix} {path} says it is of round {loaded.server_round}")
    return problems


def verify_checkpoints(
    run_dir: Path, checkpoints: Sequence[Row], rounds: Sequence[Row]
) -> list[str]:
    """Problems of every kept checkpoint (empty list when all are intact)."""
    by_round = {row["round"]: row for row in rounds}
    problems: list[str] = []
    for checkpoint in checkpoints:
        problems += verify_checkpoint(run_dir, checkpoint, by_round.get(checkpoint["round"]))
    return problems


def verify_newest_checkpointed(checkpoints: Sequence[Row], rounds: Sequence[Row]) -> list[str]:
    """The newest trained round must keep the checkpoint its chained row records.

    Without this, deleting the newest checkpoint rows and files would roll a run
    back unnoticed: resume would go on from an older checkpoint and drop rounds.
    """
    trained = [row for row in rounds if int_value(row, "round") >= 1]
    if not trained or not trained[-1].get("checkpoint_sha256"):  # the chain records none
        return []
    newest = int_value(trained[-1], "round")
    if newest in {int_value(row, "round") for row in checkpoints}:
        return []
    return [
        f"round {newest}: the newest round has no checkpoint row (kept checkpoints: "
        f"{len(checkpoints)}); its checkpoint was removed from the record"
    ]


def one_line(text: str) -> str:
    """``text`` with control characters (a newline a file smuggled in) escaped."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def verify_run(run_dir: Path) -> tuple[list[str], str]:
    """All problems of one run, and a one-line summary of what was checked.

    Raises
    ------
    RunStoreError
        If ``run.db`` cannot be read at all (the message names the run and why).
    """
    store = RunStore(run_dir, readonly=True)
    try:
        rounds, checkpoints = store.rounds(), store.checkpoints()
        version, genesis = store.schema_version, store.genesis()
        head, current = store.chain_head(), int_value(store.run_row(), "current_round")
    finally:
        store.close()
    problems = verify_chain(rounds, genesis, version)
    if version != LEGACY_SCHEMA_VERSION:
        problems += verify_head(rounds, head, current)
    problems += verify_checkpoints(run_dir, checkpoints, rounds)
    if version != LEGACY_SCHEMA_VERSION:
        problems += verify_newest_checkpointed(checkpoints, rounds)
    problems = [one_line(problem) for problem in problems]
    summary = f"{len(rounds)} round rows, {len(checkpoints)} checkpoints"
    if version == LEGACY_SCHEMA_VERSION:
        summary += f"; {LEGACY_NOTE}"
    elif head is not None:  # an operator can keep it elsewhere to detect a rewritten record
        summary += f"; head round {head['round']} {head['hash']}"
    return problems, summary


def load_verified_checkpoint(store: RunStore) -> Checkpoint | None:
    """The latest kept checkpoint, loaded only if the record vouches for it; None if none.

    Resume goes on from this file, so it must be the one the chain records: the
    chain and its head intact, the file's SHA-256 the one its chained round row
    records (the checkpoints table alone is not trusted), and the model it holds
    hashing to the round row's chained model hash.

    Raises
    ------
    CheckpointError
        Naming the first problem and ``fedcoord verify``.
    """
    rows, rounds = store.checkpoints(), store.rounds()
    missing = verify_newest_checkpointed(rows, rounds)
    if missing:
        raise CheckpointError(
            f"the record of run {store.run_dir.name!r} is not intact, refusing to resume from "
            f"it: {one_line(missing[0])} (fedcoord verify {store.run_dir.name})"
        )
    if not rows:
        return None
    latest = rows[-1]
    problems = verify_chain(rounds, store.genesis(), store.schema_version)
    current = int_value(store.run_row(), "current_round")
    problems += verify_head(rounds, store.chain_head(), current)
    by_round = {row["round"]: row for row in rounds}
    problems += verify_checkpoint(store.run_dir, latest, by_round.get(latest["round"]))
    if problems:
        raise CheckpointError(
            f"the record of run {store.run_dir.name!r} is not intact, refusing to resume from "
            f"it: {one_line(problems[0])} (all problems: fedcoord verify {store.run_dir.name})"
        )
    round_row = by_round[latest["round"]]
    path = store.run_dir / CHECKPOINT_DIR / str(latest["path"])
    checkpoint = load_checkpoint(path, str(round_row["checkpoint_sha256"]))
    if model_hash(checkpoint.arrays) != round_row["model_hash"]:  # changed since it was checked
        raise CheckpointError(f"checkpoint {path} changed while it was read; refusing it")
    return checkpoint
