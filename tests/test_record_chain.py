"""Tamper evidence of the whole record: rejections, events, nodes and the run's name.

Runs are written by the real store, rounds with their checkpoints; the tampering is
SQL on run.db and folders copied as someone with the files would do it. A schema 2
store is made by taking a current one back to that layout, column for column.
"""

import json
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from server.app import open_resumed_run, restore_start_point
from server.record.chain import link_hash, node_hash, record_head
from server.record.store import RunStore
from server.record.verify import SCHEMA_2_NOTE, verify_run
from server.ui import cli
from server.ui.dashboard.views import list_runs
from task.config import parse_run_config
from tests.helpers import execute, make_run

ROUNDS = 3
NODES = (101, 102, 103)
# A new value for each stored column of row 2 (each chain must cover every one).
LINKED_EDITS = {
    "events": {
        "id": "id + 100",
        "at": "at + 1",
        "kind": "'completed'",
        "message": "'all good'",
        "at_as_integer": "CAST(at AS INTEGER)",
    },
    "rejections": {
        "id": "id + 100",
        "round": "round + 1",
        "node_id": "'999'",
        "kind": "'ignored'",
        "reason": "'timeout'",
        "at": "at + 1",
    },
}
NODE_EDITS = {
    "node_id": "'999'",
    "partition_id": "7",
    "num_examples": "num_examples * 10",
    "device": "'cuda:0'",
    "rounds_joined": "0",
    "failures": "failures + 1",
    "rejected": "0",
    "weight": "5.0",
    "last_seen": "last_seen + 1",
    "last_error": "''",
    "partition_id_as_null": "NULL",
}


def model(server_round: int) -> dict[str, np.ndarray]:
    return {"fc.bias": np.full(4, server_round, dtype=np.float32)}


class KeptState:
    """A strategy that only keeps the state a resume restores."""

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def make_full_run(runs_dir: Path, name: str = "run") -> RunStore:
    """Rounds 1-3 with checkpoints, three nodes, rejections and events; the store open."""
    store = make_run(
        runs_dir,
        name,
        config={"seed": 1, "model": "simple-cnn"},
        num_rounds=ROUNDS,
        state=None,
        rounds=range(1, ROUNDS + 1),
        nodes=False,
        model_fn=model,
        strategy_state={"rng": np.arange(3)},
        metadata={"model": "simple-cnn", "dataset": "digits"},
    )
    for partition, node in enumerate(NODES):
        store.record_node_reply(node, partition_id=partition, num_examples=50, joined=True)
        store.add_event("joined", f"node {node}")
    store.record_node_fault(NODES[1], 2, "rejected", "array 'w' contains NaN")
    store.record_node_fault(NODES[2], 2, "failure", "timed out")
    store.record_node_fault(NODES[1], 3, "rejected", "array 'w' has shape (3,)")
    store.set_partition_weight(0, 2.5)
    store.add_event("completed", "final accuracy 0.3000")
    return store


def problems_of(run_dir: Path) -> list[str]:
    return verify_run(run_dir)[0]


def downgrade_to_schema_2(run_dir: Path) -> None:
    """Take a store back to schema 2: no links on rejections, events, nodes; no their heads."""
    execute(
        run_dir,
        "ALTER TABLE rejections DROP COLUMN chain_hash; ALTER TABLE events DROP COLUMN chain_hash;"
        "ALTER TABLE nodes DROP COLUMN row_hash; UPDATE meta SET value = '2' WHERE key = "
        "'schema_version'; DELETE FROM meta WHERE key IN ('rejections_head', 'events_head', "
        "'nodes_head');",
    )


def meta(run_dir: Path, key: str) -> str | None:
    db = sqlite3.connect(run_dir / "run.db")
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    db.close()
    return row[0] if row else None


# ------------------------------------------------------------------ intact
def test_an_intact_run_verifies_with_every_table_counted_and_one_head(tmp_path):
    # Prepare
    store = make_full_run(tmp_path)
    heads = store.heads()

    # Execute
    problems, summary = verify_run(store.run_dir)

    # Assert
    assert problems == []
    assert summary == (
        f"{ROUNDS} round rows, {ROUNDS} checkpoints, 3 node rows, 3 rejections, 4 events; "
        f"head round {ROUNDS} {record_head(heads)}"
    )
    assert heads["events"] == {
        "id": 4,
        "hash": store.chained_rows("events")[-1]["chain_hash"],
        "rows": 4,
    }
    assert heads["rejections"]["rows"] == 3 and heads["nodes"]["rows"] == 3
    assert heads["migrated"] is None


def test_a_new_run_with_no_rows_verifies(tmp_path):
    # Prepare
    store = RunStore.create(tmp_path / "fresh", "fresh", {"seed": 1}, 3)

    # Execute
    problems, summary = verify_run(store.run_dir)

    # Assert
    assert problems == []
    assert summary.startswith("0 round rows, 0 checkpoints, 0 node rows, 0 rejections, 0 events")


def test_verify_reads_one_state_of_a_run_the_server_is_writing(tmp_path, monkeypatch):
    # Prepare: the server writes an event and a node between verify's reads of heads and rows
    store = make_full_run(tmp_path)
    chained_rows = RunStore.chained_rows

    def rows_after_a_write(self: RunStore, table: str) -> list[dict[str, object]]:
        if table == "rejections":
            store.add_event("round", "written while verify reads")
            store.record_node_fault(NODES[0], 4, "rejected", "late")
        return chained_rows(self, table)

    monkeypatch.setattr(RunStore, "chained_rows", rows_after_a_write)

    # Execute
    problems, summary = verify_run(store.run_dir)

    # Assert: what was on record when verify began, whole
    assert problems == []
    assert "3 node rows, 3 rejections, 4 events" in summary
    assert len(chained_rows(store, "events")) == 5


# ---------------------------------------------------- rejections and events
@pytest.mark.parametrize(
    ("table", "column"),
    [(table, column) for table, edits in LINKED_EDITS.items() for column in edits],
)
def test_editing_any_column_of_a_rejection_or_event_is_caught(tmp_path, table, column):
    # Prepare
    store = make_full_run(tmp_path)
    target = column.split("_as_")[0]
    execute(
        store.run_dir, f"UPDATE {table} SET {target} = {LINKED_EDITS[table][column]} WHERE id = 2;"
    )

    # Execute
    problems = problems_of(store.run_dir)

    # Assert: the edited row is named; nothing else in the record is blamed
    row = 102 if column == "id" else 2
    assert any(p.startswith(f"{table} row {row}: chain hash does not match") for p in problems)
    assert all(p.startswith(f"{table} ") or p.startswith(f"the {table} head") for p in problems)


@pytest.mark.parametrize("table", sorted(LINKED_EDITS))
def test_deleting_a_middle_row_is_caught(tmp_path, table):
    # Prepare
    store = make_full_run(tmp_path)
    execute(store.run_dir, f"DELETE FROM {table} WHERE id = 2;")

    # Execute
    problems = problems_of(store.run_dir)

    # Assert
    assert problems[:2] == [
        f"{table} row 3: the row before it is row 1 (rows in between are missing)",
        f"{table} row 3: chain hash does not match its row and the one before it (a value of "
        "this row was edited, or a row before it was edited, inserted or deleted)",
    ]
    assert (
        f"the {table} head records {3 if table == 'rejections' else 4} rows, run.db has "
        in (problems[2])
    )


@pytest.mark.parametrize("table", sorted(LINKED_EDITS))
def test_deleting_the_newest_row_is_caught_by_the_head(tmp_path, table):
    # Prepare
    store = make_full_run(tmp_path)
    newest = len(store.chained_rows(table))
    execute(store.run_dir, f"DELETE FROM {table} WHERE id = {newest};")

    # Execute
    problems = problems_of(store.run_dir)

    # Assert
    assert problems == [
        f"{table} row {newest}: the {table} head records it as the newest row, but the newest "
        f"row is row {newest - 1} (newest rows deleted, or rows added)",
        f"the {table} head records {newest} rows, run.db has {newest - 1}",
    ]


@pytest.mark.parametrize("table", sorted(LINKED_EDITS))
def test_deleting_every_row_is_caught_by_the_head(tmp_path, table):
    # Prepare
    store = make_full_run(tmp_path)
    execute(store.run_dir, f"DELETE FROM {table};")

    # Execute
    problems = problems_of(store.run_dir)

    # Assert
    assert problems[0].startswith(f"{table} row ") and "the table has no rows" in problems[0]


def insert_sql(table: str) -> str:
    if table == "events":
        return "INSERT INTO events (at, kind, message) VALUES (1.0, 'resumed', 'by hand')"
    return (
        "INSERT INTO rejections (round, node_id, kind, reason, at) "
        "VALUES (1, '101', 'rejected', 'by hand', 1.0)"
    )


@pytest.mark.parametrize("table", sorted(LINKED_EDITS))
def test_inserting_a_row_is_caught(tmp_path, table):
    # Prepare
    store = make_full_run(tmp_path)
    newest = len(store.chained_rows(table))
    execute(store.run_dir, insert_sql(table) + ";")

    # Execute
    problems = problems_of(store.run_dir)

    # Assert
    assert problems[0].startswith(f"{table} row {newest + 1}: chain hash does not match")
    assert problems[1] == (
        f"{table} row {newest}: the {table} head records it as the newest row, but the newest "
        f"row is row {newest + 1} (newest rows deleted, or rows added)"
    )


@pytest.mark.parametrize("table", sorted(LINKED_EDITS))
def test_inserting_a_row_with_a_forged_link_is_still_caught_by_the_head(tmp_path, table):
    # Prepare: the new row carries the hash it would have been given
    store = make_full_run(tmp_path)
    execute(store.run_dir, insert_sql(table) + ";")
    rows = RunStore(store.run_dir, readonly=True).chained_rows(table)
    link = link_hash(table, str(rows[-2]["chain_hash"]), rows[-1])
    execute(store.run_dir, f"UPDATE {table} SET chain_hash = '{link}' WHERE id = {rows[-1]['id']};")

    # Execute
    problems = problems_of(store.run_dir)

    # Assert
    assert len(problems) == 2
    assert problems[0].startswith(f"{table} row {len(rows) - 1}: the {table} head records it")


@pytest.mark.parametrize("table", sorted(LINKED_EDITS))
def test_reordering_rows_is_caught(tmp_path, table):
    # Prepare: rows 1 and 2 trade places
    store = make_full_run(tmp_path)
    execute(
        store.run_dir,
        f"UPDATE {table} SET id = -1 WHERE id = 1; UPDATE {table} SET id = 1 WHERE id = 2;"
        f"UPDATE {table} SET id = 2 WHERE id = -1;",
    )

    # Execute
    problems = problems_of(store.run_dir)

    # Assert: both rows, and the one after them (its link follows the row that was second)
    assert [p.split(":")[0] for p in problems] == [f"{table} row {i}" for i in (1, 2, 3)]


def test_a_rewritten_tail_changes_the_printed_head(tmp_path):
    # Prepare: the newest event deleted and its head rewritten to match: consistent, no secret
    store = make_full_run(tmp_path)
    _, intact = verify_run(store.run_dir)
    last = store.chained_rows("events")[-2]
    head = json.dumps({"id": last["id"], "hash": last["chain_hash"], "rows": 3})
    execute(
        store.run_dir,
        f"DELETE FROM events WHERE id = 4; UPDATE meta SET value = '{head}' "
        "WHERE key = 'events_head';",
    )

    # Execute
    problems, summary = verify_run(store.run_dir)

    # Assert: not caught from the file alone; the head kept elsewhere differs
    assert problems == []
    assert summary.split()[-1] != intact.split()[-1]


def test_events_copied_from_another_run_are_caught(tmp_path):
    # Prepare: run b's events and their head replaced by run a's
    a, b = make_full_run(tmp_path, "a"), make_full_run(tmp_path, "b")
    a.close()
    execute(
        b.run_dir,
        f"ATTACH '{a.db_path}' AS a; DELETE FROM events; INSERT INTO events SELECT * FROM a.events;"
        "UPDATE meta SET value = (SELECT value FROM a.meta WHERE key = 'events_head') "
        "WHERE key = 'events_head';",
    )

    # Execute
    problems = problems_of(b.run_dir)

    # Assert: the first event no longer follows run b's genesis
    assert problems == [
        "events row 1: chain hash does not match its row and the one before it (a value of this "
        "row was edited, or a row before it was edited, inserted or deleted)"
    ]


# -------------------------------------------------------------------- nodes
@pytest.mark.parametrize("column", sorted(NODE_EDITS))
def test_editing_any_column_of_a_node_row_is_caught(tmp_path, column):
    # Prepare
    store = make_full_run(tmp_path)
    target = column.split("_as_")[0]
    execute(
        store.run_dir, f"UPDATE nodes SET {target} = {NODE_EDITS[column]} WHERE node_id = '102';"
    )

    # Execute
    problems = problems_of(store.run_dir)

    # Assert
    node = 999 if column == "node_id" else 102
    assert problems == [
        f"nodes row {node}: hash does not match its row (a value of this row was edited, or the "
        "row was inserted)"
    ]


def test_a_node_row_edited_with_its_hash_rewritten_is_caught_by_the_head(tmp_path):
    # Prepare
    store = make_full_run(tmp_path)
    execute(store.run_dir, "UPDATE nodes SET rejected = 0, last_error = '' WHERE node_id = '102';")
    row = next(n for n in RunStore(store.run_dir, readonly=True).nodes() if n["node_id"] == "102")
    execute(
        store.run_dir,
        f"UPDATE nodes SET row_hash = '{node_hash(store.genesis(), row)}' WHERE node_id = '102';",
    )

    # Execute
    problems = problems_of(store.run_dir)

    # Assert
    assert problems == [
        "the nodes head does not match the node rows (a node row was replaced, or edited with "
        "its hash rewritten)"
    ]


def test_deleting_and_inserting_node_rows_is_caught(tmp_path):
    # Prepare
    deleted, inserted = make_full_run(tmp_path, "deleted"), make_full_run(tmp_path, "inserted")
    execute(deleted.run_dir, "DELETE FROM nodes WHERE node_id = '103';")
    execute(inserted.run_dir, "INSERT INTO nodes (node_id, partition_id) VALUES ('104', 3);")

    # Execute / Assert
    assert problems_of(deleted.run_dir) == [
        "the nodes head records 3 node rows, run.db has 2 (node rows deleted or inserted)"
    ]
    assert problems_of(inserted.run_dir) == [
        "nodes row 104: hash does not match its row (a value of this row was edited, or the row "
        "was inserted)",
        "the nodes head records 3 node rows, run.db has 4 (node rows deleted or inserted)",
    ]


def test_a_missing_head_of_each_table_is_one_line(tmp_path):
    # Prepare
    store = make_full_run(tmp_path)
    execute(
        store.run_dir,
        "DELETE FROM meta WHERE key IN ('rejections_head', 'events_head');"
        "UPDATE meta SET value = '{\"rows\": \"3\"}' WHERE key = 'nodes_head';",
    )

    # Execute
    problems, summary = verify_run(store.run_dir)

    # Assert: no head is printed without all of them
    assert problems == [
        "the rejections head (newest row and hash) is missing from run.db or malformed",
        "the events head (newest row and hash) is missing from run.db or malformed",
        "the nodes head (rows and digest) is missing from run.db or malformed",
    ]
    assert "head round" not in summary


def test_cli_verify_names_the_table_and_row(tmp_path, capsys):
    # Prepare
    store = make_full_run(tmp_path)
    execute(
        store.run_dir,
        "UPDATE events SET message = 'fine' WHERE id = 3;"
        "UPDATE rejections SET reason = 'fine' WHERE id = 1;"
        "UPDATE nodes SET device = 'cuda' WHERE node_id = '101';",
    )

    # Execute
    code = cli.main(["--runs-dir", str(tmp_path), "verify", "run"])

    # Assert
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert lines[0].startswith("run: 3 problem(s) in 3 round rows, 3 checkpoints, 3 node rows")
    assert [line.split(":")[0] for line in lines[1:]] == [
        "  rejections row 1",
        "  events row 3",
        "  nodes row 101",
    ]


# ------------------------------------------------------------ the run's name
def test_a_copied_run_folder_is_reported_and_listed_under_its_folder_name(tmp_path, capsys):
    # Prepare
    store = make_full_run(tmp_path, "a")
    store.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")

    # Execute
    problems = problems_of(tmp_path / "b")
    listed = cli.main(["--runs-dir", str(tmp_path), "runs"])
    runs_out = capsys.readouterr().out.splitlines()
    cli.main(["--runs-dir", str(tmp_path), "status", "b"])
    status_out = capsys.readouterr().out
    cli.main(["--runs-dir", str(tmp_path), "status", "b", "--json"])
    status = json.loads(capsys.readouterr().out)
    dashboard = {run["run_name"]: run for run in list_runs(tmp_path)["runs"]}

    # Assert
    assert problems == ["run folder 'b' holds run 'a' (copied or renamed)"]
    assert problems_of(tmp_path / "a") == []
    assert listed == 0
    assert runs_out[1].startswith("a ") and "holds run" not in runs_out[1]
    assert runs_out[2].startswith("b ") and runs_out[2].endswith("  (holds run 'a')")
    assert status_out.startswith(f"run        b  (holds run 'a')  ({tmp_path / 'b'})")
    assert status["run_name"] == "b" and status["stored_run_name"] == "a"
    assert dashboard["b"]["stored_run_name"] == "a" and dashboard["a"]["stored_run_name"] == "a"


# ------------------------------------------------------ older run folders
def make_schema_2_run(runs_dir: Path, state: str = "stopped") -> RunStore:
    store = make_full_run(runs_dir)
    store.update_run(state=state)
    store.close()
    downgrade_to_schema_2(store.run_dir)
    return RunStore(store.run_dir, readonly=True)


def test_a_schema_2_run_verifies_its_rounds_and_says_what_is_not_covered(tmp_path):
    # Prepare
    store = make_schema_2_run(tmp_path)
    execute(store.run_dir, "UPDATE events SET message = 'edited' WHERE id = 1;")

    # Execute
    problems, summary = verify_run(store.run_dir)

    # Assert: the edit is out of its reach; reading migrated nothing
    assert problems == []
    assert summary == (
        f"{ROUNDS} round rows, {ROUNDS} checkpoints; {SCHEMA_2_NOTE}; head round {ROUNDS} "
        f"{store.chain_head()['hash']}"
    )
    assert store.schema_version == 2 and meta(store.run_dir, "schema_version") == "2"
    assert meta(store.run_dir, "events_head") is None


def test_a_schema_2_run_is_migrated_by_its_first_chained_write_not_by_opening(tmp_path):
    # Prepare
    run_dir = make_schema_2_run(tmp_path).run_dir
    store = RunStore(run_dir)

    # Execute
    store.add_command("pause")  # the operator's queue: as an older server would read it
    version_after_command = meta(run_dir, "schema_version")
    store.add_event("resumed", "from round 3")
    problems, summary = verify_run(run_dir)

    # Assert
    assert version_after_command == "2"
    assert meta(run_dir, "schema_version") == "3" and store.schema_version == 3
    assert problems == []
    assert "3 node rows, 3 rejections, 5 events; schema 2 until " in summary
    assert "its 3 rejections, 4 events and 3 node rows of then were chained when the run" in summary
    assert summary.split()[-3:-1] == ["round", str(ROUNDS)]


def test_a_migrated_run_catches_later_edits_of_rows_written_before(tmp_path):
    # Prepare
    run_dir = make_schema_2_run(tmp_path).run_dir
    RunStore(run_dir).record_node_reply(NODES[0], joined=True)
    execute(run_dir, "UPDATE events SET message = 'edited' WHERE id = 1;")

    # Execute
    problems = problems_of(run_dir)

    # Assert
    assert problems[0].startswith("events row 1: chain hash does not match")


def test_resuming_a_schema_2_run_migrates_it_and_goes_on_from_its_checkpoint(tmp_path):
    # Prepare: a stopped schema 2 run, a stop queued after its server died
    run_dir = make_schema_2_run(tmp_path).run_dir
    execute(run_dir, f"UPDATE run SET heartbeat_at = {time.time() - 60};")
    execute(run_dir, "INSERT INTO commands (command, created_at) VALUES ('stop', 1.0);")
    config = parse_run_config(
        {"run-name": "run", "resume": True, "runs-dir": str(tmp_path), "num-server-rounds": 5}
    )

    # Execute
    store = open_resumed_run(config)
    start = restore_start_point(store, config, KeptState())

    # Assert
    assert start is not None and start.first_round == ROUNDS + 1
    assert store.schema_version == 3
    assert store.chained_rows("events")[-1]["kind"] == "dropped"
    assert problems_of(run_dir) == []
