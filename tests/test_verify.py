"""Tamper evidence of a run's record: every edit, deletion or swapped checkpoint is caught.

Runs are written by the real store and checkpoint code; the tampering is done the
way someone with the file would do it, with SQL on run.db and bytes on the files.
"""

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from server.app import restore_start_point
from server.record.chain import legacy_chain_hash, record_head
from server.record.checkpoints import (
    CheckpointError,
    checkpoint_path,
    file_sha256,
    model_hash,
    save_checkpoint,
)
from server.record.store import (
    DB_NAME,
    GENESIS_HASH,
    SCHEMA,
    RoundRecord,
    RunStore,
    RunStoreError,
)
from server.record.verify import load_verified_checkpoint, verify_run
from server.ui import cli
from task.config import ConfigError, parse_run_config
from tests.helpers import execute, make_run, round_record

ROUNDS = 3


def other_first_digit(column: str) -> str:
    """SQL for the hex digest in ``column`` with its first digit changed.

    Always writing '0' would leave 1 digest in 16 as it was (checkpoint digests
    differ from run to run), and the test would then fail by chance.
    """
    return f"CASE WHEN substr({column}, 1, 1) = '0' THEN '1' ELSE '0' END || substr({column}, 2)"


METADATA = {"model": "simple-cnn", "dataset": "digits"}
# A new value for each stored column of round 2 (the chain must cover every one).
COLUMN_EDITS = {
    "started_at": "started_at + 0.5",
    "ended_at": "ended_at + 0.5",
    "duration_s": "duration_s * 2",
    "sampled": "sampled + 1",
    "accepted": "accepted + 1",
    "rejected": "rejected + 1",
    "failed": "failed + 1",
    "updated": "0",
    "train_loss": "0.01",
    "central_loss": "central_loss / 2",
    "central_accuracy": "0.99",
    "federated_loss": "0.02",
    "federated_accuracy": "0.98",
    "metrics_json": "'{}'",
    "model_hash": other_first_digit("model_hash"),
    "note": "'all good'",
    "checkpoint_sha256": other_first_digit("checkpoint_sha256"),
    "central_accuracy_as_text": "'0.6'",
}


def arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "bn.num_batches_tracked": np.array(seed, dtype=np.int64),
        "fc.bias": rng.normal(size=(10,)).astype(np.float32),
    }


def verified_round(server_round: int) -> RoundRecord:
    metrics = {
        "central-accuracy": 0.1 * server_round,
        "central-loss": 2.0 / server_round,
        "train-loss": 1.5,
        "federated-loss": 1.2,
        "federated-accuracy": 0.5,
    }
    started_at = 10.0 * server_round
    return round_record(
        server_round,
        started_at=started_at,
        ended_at=started_at + 2.5,
        updated=True,
        metrics=metrics,
    )


# A run of ROUNDS rounds, each with its checkpoint, as the coordinator records it.
VERIFIED_RUN = {
    "config": {"seed": 1, "model": "simple-cnn"},
    "num_rounds": ROUNDS,
    "state": None,
    "rounds": range(1, ROUNDS + 1),
    "nodes": False,
    "record_fn": verified_round,
    "model_fn": arrays,
    "strategy_state": {"rng": np.arange(3)},
    "metadata": METADATA,
}


def swap_checkpoint(run_dir: Path, server_round: int, model: dict, state: dict) -> str:
    """Replace a checkpoint file by another valid one and edit the checkpoints table to match."""
    path, digest = save_checkpoint(run_dir, server_round, model, state, METADATA)
    execute(run_dir, f"UPDATE checkpoints SET sha256 = '{digest}' WHERE round = {server_round};")
    return str(path)


def test_an_intact_run_verifies_and_the_summary_names_the_head(tmp_path):
    # Prepare
    store = make_run(tmp_path, **VERIFIED_RUN)
    head = store.chain_head()

    # Execute
    problems, summary = verify_run(store.run_dir)

    # Assert
    assert problems == []
    assert head == {"round": ROUNDS, "hash": store.rounds()[-1]["chain_hash"], "rows": ROUNDS}
    assert summary == (
        "3 round rows, 3 checkpoints, 0 node rows, 0 rejections, 0 events; head round 3 "
        f"{record_head(store.heads())}"
    )


@pytest.mark.parametrize("column", sorted(COLUMN_EDITS))
def test_editing_any_column_of_a_round_row_is_caught(tmp_path, column):
    # Prepare
    store = make_run(tmp_path, **VERIFIED_RUN)
    target = column.removesuffix("_as_text")
    execute(store.run_dir, f"UPDATE rounds SET {target} = {COLUMN_EDITS[column]} WHERE round = 2;")

    # Execute
    problems, _ = verify_run(store.run_dir)

    # Assert
    assert any(problem.startswith("round 2: chain hash does not match") for problem in problems)


def test_deleting_the_newest_rounds_is_caught(tmp_path):
    # Prepare
    store = make_run(tmp_path, **VERIFIED_RUN)
    execute(store.run_dir, "DELETE FROM rounds WHERE round >= 2; DELETE FROM checkpoints;")

    # Execute
    problems, _ = verify_run(store.run_dir)

    # Assert
    assert any(p.startswith("round 3: the chain head records it as the newest") for p in problems)
    assert "the chain head records 3 round rows, run.db has 1" in problems


def test_deleting_the_newest_rounds_and_the_head_is_caught(tmp_path):
    # Prepare: rows, checkpoints and the head gone, as if the run had stopped after round 1
    store = make_run(tmp_path, **VERIFIED_RUN)
    execute(
        store.run_dir,
        "DELETE FROM rounds WHERE round >= 2; DELETE FROM checkpoints WHERE round >= 2;"
        "DELETE FROM meta WHERE key = 'chain_head';",
    )

    # Execute
    problems, _ = verify_run(store.run_dir)

    # Assert
    assert problems == [
        "the chain head (newest round and hash) is missing from run.db or malformed"
    ]


def test_moving_the_head_back_still_disagrees_with_current_round(tmp_path):
    # Prepare: the newest rows deleted and the head rewritten to match them
    store = make_run(tmp_path, **VERIFIED_RUN)
    first = store.rounds()[0]["chain_hash"]
    head = f'{{"round": 1, "hash": "{first}", "rows": 1}}'
    execute(
        store.run_dir,
        f"DELETE FROM rounds WHERE round >= 2; UPDATE meta SET value = '{head}' "
        "WHERE key = 'chain_head';",
    )

    # Execute
    problems, _ = verify_run(store.run_dir)

    # Assert
    assert "run.current_round is 3, the chain head records round 1" in problems


def test_deleting_a_middle_round_is_caught(tmp_path):
    # Prepare
    store = make_run(tmp_path, **VERIFIED_RUN)
    execute(store.run_dir, "DELETE FROM rounds WHERE round = 2;")

    # Execute
    problems, _ = verify_run(store.run_dir)

    # Assert
    assert any(p.startswith("round 3: the row before it is round 1") for p in problems)
    assert any(p.startswith("round 3: chain hash does not match") for p in problems)


@pytest.mark.parametrize(
    "edit",
    [
        'UPDATE run SET config_json = \'{"seed": 2, "model": "simple-cnn"}\';',
        "UPDATE run SET run_name = 'other';",
        "UPDATE run SET created_at = created_at + 1;",
    ],
)
def test_the_chain_is_bound_to_the_run_it_was_recorded_for(tmp_path, edit):
    # Prepare
    store = make_run(tmp_path, **VERIFIED_RUN)
    execute(store.run_dir, edit)

    # Execute
    problems, _ = verify_run(store.run_dir)

    # Assert: the first row no longer follows this run's genesis
    assert problems[0].startswith("round 1: chain hash does not match")


def test_rows_copied_from_another_run_are_caught(tmp_path):
    # Prepare: run b's round rows and head replaced by run a's (same shape, other run)
    a, b = make_run(tmp_path, "a", **VERIFIED_RUN), make_run(tmp_path, "b", **VERIFIED_RUN)
    a.close()
    execute(
        b.run_dir,
        f"ATTACH '{a.db_path}' AS a; DELETE FROM rounds; INSERT INTO rounds SELECT * FROM a.rounds;"
        "UPDATE meta SET value = (SELECT value FROM a.meta WHERE key = 'chain_head') "
        "WHERE key = 'chain_head';",
    )

    # Execute
    problems, _ = verify_run(b.run_dir)

    # Assert
    assert problems[0].startswith("round 1: chain hash does not match")


def test_a_checkpoint_swapped_with_its_table_row_edited_is_caught(tmp_path):
    # Prepare: another model in round 2's file, the checkpoints table edited to match it
    store = make_run(tmp_path, **VERIFIED_RUN)
    path = swap_checkpoint(store.run_dir, 2, arrays(99), {"rng": np.arange(3)})

    # Execute
    problems, _ = verify_run(store.run_dir)

    # Assert
    assert len(problems) == 2
    assert problems[0].startswith(f"round 2: checkpoint {path} is not the file its chained round")
    assert problems[1].startswith(f"round 2: checkpoint {path} holds a model with hash")


def test_a_checkpoint_with_the_same_model_but_other_strategy_state_is_caught(tmp_path):
    # Prepare: the model kept, the server optimiser state poisoned
    store = make_run(tmp_path, **VERIFIED_RUN)
    swap_checkpoint(store.run_dir, 3, arrays(3), {"rng": np.full(3, 7)})

    # Execute
    problems, _ = verify_run(store.run_dir)

    # Assert
    assert len(problems) == 1 and "is not the file its chained round row records" in problems[0]


def test_a_checkpoint_row_naming_a_file_outside_the_folder_is_refused_unread(tmp_path):
    # Prepare
    store = make_run(tmp_path, **VERIFIED_RUN)
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not for verify")
    execute(
        store.run_dir, "UPDATE checkpoints SET path = '../../secret.safetensors' WHERE round = 1;"
    )

    # Execute
    problems, _ = verify_run(store.run_dir)

    # Assert
    assert problems == [
        "round 1: checkpoint row names the file '../../secret.safetensors', "
        "not 'round-00001.safetensors'"
    ]


def test_a_missing_and_an_altered_checkpoint_are_one_line_each(tmp_path):
    # Prepare
    store = make_run(tmp_path, **VERIFIED_RUN)
    checkpoint_path(store.run_dir, 1).unlink()
    target = checkpoint_path(store.run_dir, 3)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))

    # Execute
    problems, _ = verify_run(store.run_dir)

    # Assert
    assert problems == [
        f"round 1: checkpoint {checkpoint_path(store.run_dir, 1)} is missing",
        f"round 3: checkpoint {target} is altered: sha256 {file_sha256(target)}, run.db records "
        f"{store.checkpoints()[-1]['sha256']}",
    ]


def test_a_newline_smuggled_into_the_record_stays_on_one_line(tmp_path):
    # Prepare
    store = make_run(tmp_path, **VERIFIED_RUN)
    execute(store.run_dir, "UPDATE checkpoints SET sha256 = 'x' || char(10) || 'round 9: fine';")

    # Execute
    problems, _ = verify_run(store.run_dir)

    # Assert
    assert problems and all("\n" not in problem for problem in problems)


def test_cli_verify_prints_one_line_per_problem_and_exits_1(tmp_path, capsys):
    # Prepare
    store = make_run(tmp_path, **VERIFIED_RUN)
    execute(
        store.run_dir,
        "UPDATE rounds SET accepted = 3 WHERE round = 2; DELETE FROM rounds WHERE round = 3;",
    )

    # Execute
    code = cli.main(["--runs-dir", str(tmp_path), "verify", "run"])

    # Assert
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert lines[0].startswith("run: ") and "problem(s) in 2 round rows" in lines[0]
    assert all(
        line.startswith("  round ") or line.startswith("  the chain head") for line in lines[1:]
    )
    assert any(line.startswith("  round 2: chain hash does not match") for line in lines)


# ------------------------------------------------------------------- resume
def test_resume_loads_the_chained_checkpoint(tmp_path):
    # Prepare
    store = make_run(tmp_path, **VERIFIED_RUN)

    # Execute
    checkpoint = load_verified_checkpoint(store)

    # Assert
    assert checkpoint is not None and checkpoint.server_round == ROUNDS
    assert model_hash(checkpoint.arrays) == model_hash(arrays(ROUNDS))
    assert checkpoint.arrays["bn.num_batches_tracked"].shape == ()


def test_resume_refuses_a_swapped_checkpoint_even_with_the_table_edited(tmp_path):
    # Prepare
    store = make_run(tmp_path, **VERIFIED_RUN)
    swap_checkpoint(store.run_dir, ROUNDS, arrays(99), {"rng": np.arange(3)})

    # Execute / Assert
    with pytest.raises(CheckpointError, match="not intact, refusing to resume") as error:
        load_verified_checkpoint(store)
    assert "fedcoord verify run" in str(error.value)


def test_resume_refuses_a_swapped_checkpoint_whose_round_row_was_edited_too(tmp_path):
    # Prepare: file, checkpoints table and the round's hashes all edited to match
    store = make_run(tmp_path, **VERIFIED_RUN)
    model = arrays(99)
    swap_checkpoint(store.run_dir, ROUNDS, model, {"rng": np.arange(3)})
    digest = file_sha256(checkpoint_path(store.run_dir, ROUNDS))
    execute(
        store.run_dir,
        f"UPDATE rounds SET model_hash = '{model_hash(model)}', checkpoint_sha256 = '{digest}' "
        f"WHERE round = {ROUNDS};",
    )

    # Execute / Assert: the chain no longer holds
    with pytest.raises(CheckpointError, match=f"round {ROUNDS}: chain hash does not match"):
        load_verified_checkpoint(store)


class RecordingStrategy:
    def __init__(self) -> None:
        self.state: dict | None = None

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def test_restore_start_point_refuses_a_tampered_checkpoint_as_a_config_error(tmp_path):
    # Prepare
    store = make_run(tmp_path, **VERIFIED_RUN)
    config = parse_run_config({"run-name": "run", "resume": True, "runs-dir": str(tmp_path)})
    strategy = RecordingStrategy()
    intact = restore_start_point(store, config, strategy)
    swap_checkpoint(store.run_dir, ROUNDS, arrays(99), {"rng": np.arange(3)})

    # Execute / Assert
    assert intact is not None and intact.first_round == ROUNDS + 1 and strategy.state is not None
    with pytest.raises(ConfigError, match="^resume: the record of run 'run' is not intact"):
        restore_start_point(store, config, RecordingStrategy())


@pytest.mark.parametrize("deleted", ["WHERE round = {newest}", ""])
def test_removing_the_newest_checkpoints_is_caught_and_resume_refused(tmp_path, deleted):
    # Prepare: the newest (or every) checkpoint row and file removed, to roll the run back
    store = make_run(tmp_path, **VERIFIED_RUN)
    execute(store.run_dir, f"DELETE FROM checkpoints {deleted.format(newest=ROUNDS)};")
    for path in (store.run_dir / "checkpoints").glob("*.safetensors"):
        if not deleted or path.name == f"round-{ROUNDS:05d}.safetensors":
            path.unlink()
    config = parse_run_config({"run-name": "run", "resume": True, "runs-dir": str(tmp_path)})

    # Execute
    problems, _ = verify_run(store.run_dir)

    # Assert: verify names the newest round; resume neither rolls back nor starts over
    assert any(f"round {ROUNDS}: the newest round has no checkpoint" in p for p in problems)
    with pytest.raises(ConfigError, match="newest round has no checkpoint"):
        restore_start_point(store, config, RecordingStrategy())
    assert len(store.rounds()) == ROUNDS


# --------------------------------------------------- runs of the older format
def make_legacy_run(runs_dir: Path) -> Path:
    """A run.db as fedcoord wrote it before schema 2: three-column chain, no head."""
    run_dir = runs_dir / "old"
    run_dir.mkdir(parents=True)
    db = sqlite3.connect(run_dir / DB_NAME)
    db.executescript(SCHEMA.replace(",\n    checkpoint_sha256 TEXT NOT NULL DEFAULT ''", ""))
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute(
        "INSERT INTO run (id, run_name, state, num_rounds, current_round, config_json,"
        " created_at, updated_at) VALUES (1, 'old', 'completed', 2, 2, '{}', 1.0, 2.0)"
    )
    previous = GENESIS_HASH
    for server_round in (1, 2):
        metrics_json = f'{{"central-accuracy": {0.4 * server_round}}}'
        link = legacy_chain_hash(previous, "h", server_round, metrics_json)
        db.execute(
            "INSERT INTO rounds VALUES (?, 0, 1, 1, 2, 2, 0, 0, 1, NULL, NULL, ?, NULL, NULL,"
            " ?, 'h', ?, '')",
            (server_round, 0.4 * server_round, metrics_json, link),
        )
        previous = link
    db.commit()
    db.close()
    return run_dir


def test_a_schema_1_run_is_verified_as_far_as_its_chain_goes_and_says_so(tmp_path, capsys):
    # Prepare
    run_dir = make_legacy_run(tmp_path)

    # Execute
    problems, summary = verify_run(run_dir)
    code = cli.main(["--runs-dir", str(tmp_path), "status", "old"])

    # Assert
    assert problems == []
    assert "schema 1 (older fedcoord)" in summary and "deleted newest rounds" in summary
    assert summary.endswith("node, rejection and event rows are not covered")
    assert code == 0 and "completed" in capsys.readouterr().out


def test_a_schema_1_run_edit_is_still_caught_but_it_is_never_written(tmp_path):
    # Prepare
    run_dir = make_legacy_run(tmp_path)
    execute(run_dir, "UPDATE rounds SET metrics_json = '{}' WHERE round = 1;")

    # Execute
    problems, _ = verify_run(run_dir)

    # Assert
    assert problems[0].startswith("round 1: chain hash does not match")
    with pytest.raises(RunStoreError, match="recorded by an older fedcoord .run.db schema 1."):
        RunStore(run_dir)
