"""``fedcoord verify``: check a run's record against itself and its checkpoint files.

What is checked (schema 3, see :mod:`server.record.chain`):

- the chain: each round row's hash over all its columns and the previous hash,
  from the genesis hash bound to the run's name, creation time and config;
- the head: the newest row is the one the chain head records (round, hash and
  number of rows) and ``run.current_round`` agrees, so deleted newest rows show;
- each kept checkpoint: its file is the one of its round, its SHA-256 is the one
  the chained round row records (and the checkpoints table), and the model it
  holds hashes to the round row's chained model hash;
- the ``rejections`` and ``events`` chains and their heads, the same way;
- each node row's hash, and the nodes head (number of rows, digest of their hashes);
- the run folder's name against the run name the record is bound to.

Every problem is one line naming the table and row (``round R: ...``, ``events
row 7: ...``). A run of an older schema is checked as far as its record goes,
and the summary says what is left out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from server.record.chain import (
    LINKED_TABLES,
    chain_hash,
    legacy_chain_hash,
    link_hash,
    node_hash,
    nodes_digest,
    record_head,
)
from server.record.checkpoints import (
    CHECKPOINT_DIR,
    Checkpoint,
    CheckpointError,
    checkpoint_file_problem,
    file_sha256,
    load_checkpoint,
    model_hash,
)
from server.record.schema import (
    LEGACY_SCHEMA_VERSION,
    PREVIOUS_SCHEMA_VERSION,
    SCHEMA_VERSION,
    int_value,
)
from server.record.store import RunStore

Row = Mapping[str, object]
LEGACY_NOTE = (
    "schema 1 (older fedcoord): its chain covers only each row's model hash, round and "
    "metrics, and deleted newest rounds cannot be seen; node, rejection and event rows "
    "are not covered"
)
SCHEMA_2_NOTE = (
    "schema 2 (older fedcoord): node, rejection and event rows are not covered (resuming "
    "the run with this fedcoord covers them from then on)"
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
    newest_differs = last is not None and (
        head["round"] != last["round"] or head["hash"] != last["chain_hash"]
    )
    if newest_differs or (last is None and head["round"] is not None):
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


def verify_linked(table: str, rows: Sequence[Row], genesis: str) -> list[str]:
    """Problems in the chain of an append-only ``table`` (``rejections``, ``events``)."""
    problems = []
    previous = genesis
    for index, row in enumerate(rows):
        if index and row["id"] != int_value(rows[index - 1], "id") + 1:
            problems.append(
                f"{table} row {row['id']}: the row before it is row {rows[index - 1]['id']} "
                "(rows in between are missing)"
            )
        if link_hash(table, previous, row) != row["chain_hash"]:
            problems.append(
                f"{table} row {row['id']}: chain hash does not match its row and the one before "
                "it (a value of this row was edited, or a row before it was edited, inserted or "
                "deleted)"
            )
        previous = str(row["chain_hash"])
    return problems


def verify_table_head(table: str, rows: Sequence[Row], head: Row | None) -> list[str]:
    """Problems binding the newest row of ``table`` to its recorded head."""
    if head is None:
        return [f"the {table} head (newest row and hash) is missing from run.db or malformed"]
    last, head_id = (rows[-1] if rows else None), head["id"]
    problems = []
    if last is None and head_id is not None:
        problems.append(
            f"{table} row {head_id}: the {table} head records it as the newest row, but the "
            "table has no rows (rows deleted)"
        )
    elif last is not None and head_id is None:
        problems.append(
            f"{table} row {last['id']}: the {table} head records no rows, but this row is there "
            "(rows added after the head was written)"
        )
    elif last is not None and head_id != last["id"]:
        problems.append(
            f"{table} row {head_id}: the {table} head records it as the newest row, but the "
            f"newest row is row {last['id']} (newest rows deleted, or rows added)"
        )
    elif last is not None and head["hash"] != last["chain_hash"]:
        problems.append(
            f"{table} row {head_id}: its chain hash is not the one the {table} head records "
            "(this row, or the rows before it, rewritten)"
        )
    if head["rows"] != len(rows):
        problems.append(f"the {table} head records {head['rows']} rows, run.db has {len(rows)}")
    return problems


def verify_nodes(nodes: Sequence[Row], head: Row | None, genesis: str) -> list[str]:
    """Problems of the node rows: each row's hash, and the nodes head over all of them."""
    problems = [
        f"nodes row {node['node_id']}: hash does not match its row (a value of this row was "
        "edited, or the row was inserted)"
        for node in nodes
        if node_hash(genesis, node) != node["row_hash"]
    ]
    if head is None:
        return [*problems, "the nodes head (rows and digest) is missing from run.db or malformed"]
    if head["rows"] != len(nodes):
        problems.append(
            f"the nodes head records {head['rows']} node rows, run.db has {len(nodes)} "
            "(node rows deleted or inserted)"
        )
    elif head["hash"] != nodes_digest(genesis, [str(node["row_hash"]) for node in nodes]):
        problems.append(
            "the nodes head does not match the node rows (a node row was replaced, or edited "
            "with its hash rewritten)"
        )
    return problems


def verify_run_name(run_dir: Path, run: Row) -> list[str]:
    """The run folder's name must be the run name its record is bound to."""
    if run["run_name"] == run_dir.name:
        return []
    return [f"run folder {run_dir.name!r} holds run {run['run_name']!r} (copied or renamed)"]


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


@dataclass(frozen=True)
class RecordSnapshot:
    """What ``verify`` reads of one run, in one go: rows, heads and how they are bound."""

    version: int
    genesis: str
    run: Row
    rounds: list[dict[str, object]]
    checkpoints: list[dict[str, object]]
    heads: dict[str, dict[str, object] | None]
    linked: dict[str, list[dict[str, object]]]  # rejections and events (schema 3 only)
    nodes: list[dict[str, object]]


def read_snapshot(run_dir: Path) -> RecordSnapshot:
    """Read everything ``verify`` checks; a store of an older schema has no linked rows.

    Raises
    ------
    RunStoreError
        If ``run.db`` cannot be read (the message names the run and why).
    """
    store = RunStore(run_dir, readonly=True)
    try:
        with store.one_view():  # a live run's writes between these reads stay out
            version = store.schema_version
            current = version == SCHEMA_VERSION
            return RecordSnapshot(
                version=version,
                genesis=store.genesis(),
                run=store.run_row(),
                rounds=store.rounds(),
                checkpoints=store.checkpoints(),
                heads=store.heads(),
                linked={t: store.chained_rows(t) for t in LINKED_TABLES if current},
                nodes=store.nodes() if current else [],
            )
    finally:
        store.close()


def verify_rounds_record(run_dir: Path, record: RecordSnapshot) -> list[str]:
    """Problems of the round chain, its head and the kept checkpoints."""
    rounds, checkpoints = record.rounds, record.checkpoints
    problems = verify_chain(rounds, record.genesis, record.version)
    if record.version != LEGACY_SCHEMA_VERSION:
        current = int_value(record.run, "current_round")
        problems += verify_head(rounds, record.heads["rounds"], current)
    problems += verify_checkpoints(run_dir, checkpoints, rounds)
    if record.version != LEGACY_SCHEMA_VERSION:
        problems += verify_newest_checkpointed(checkpoints, rounds)
    return problems


def verify_other_tables(record: RecordSnapshot) -> list[str]:
    """Problems of the rejections and events chains and of the node rows (schema 3)."""
    problems: list[str] = []
    for table, rows in record.linked.items():
        problems += verify_linked(table, rows, record.genesis)
        problems += verify_table_head(table, rows, record.heads[table])
    return problems + verify_nodes(record.nodes, record.heads["nodes"], record.genesis)


def verify_run(run_dir: Path) -> tuple[list[str], str]:
    """All problems of one run, and a one-line summary of what was checked.

    Raises
    ------
    RunStoreError
        If ``run.db`` cannot be read at all (the message names the run and why).
    """
    record = read_snapshot(run_dir)
    problems = verify_rounds_record(run_dir, record)
    if record.version == SCHEMA_VERSION:
        problems += verify_other_tables(record)
    problems += verify_run_name(run_dir, record.run)
    return [one_line(problem) for problem in problems], summarize(record)


def summarize(record: RecordSnapshot) -> str:
    """What was checked, what an older schema leaves out, and the head to keep elsewhere.

    The head is one value over every table's head (:func:`server.record.chain.record_head`;
    schema 2: the round chain's head), so an operator keeps one value to compare later.
    """
    summary = f"{len(record.rounds)} round rows, {len(record.checkpoints)} checkpoints"
    if record.version == LEGACY_SCHEMA_VERSION:
        return f"{summary}; {LEGACY_NOTE}"
    rounds_head = record.heads["rounds"]
    if record.version == PREVIOUS_SCHEMA_VERSION:
        summary += f"; {SCHEMA_2_NOTE}"
        head = rounds_head["hash"] if rounds_head is not None else None
    else:
        summary += (
            f", {len(record.nodes)} node rows, {len(record.linked['rejections'])} rejections, "
            f"{len(record.linked['events'])} events"
        )
        marker = record.heads["migrated"]
        if marker is not None:
            summary += f"; {migrated_note(marker)}"
        recorded = [record.heads[key] for key in ("rounds", *LINKED_TABLES, "nodes")]
        head = record_head(record.heads) if None not in recorded else None
    if rounds_head is not None and head is not None:
        summary += f"; head round {rounds_head['round']} {head}"
    return summary


def migrated_note(marker: Row) -> str:
    """What a migration from schema 2 chained at once, and what that leaves out."""
    at = marker["at"]
    when = "?"
    if isinstance(at, int | float) and math.isfinite(at) and 0 <= at < 1e11:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at))
    return (
        f"schema 2 until {when}: its {marker['rejections']} rejections, {marker['events']} "
        f"events and {marker['nodes']} node rows of then were chained when the run was "
        "resumed, so an edit made before that cannot be seen"
    )


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
