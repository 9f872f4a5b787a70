"""A corrupt or foreign run directory: every ``fedcoord`` verb answers one line, never a traceback.

Each kind of damage a run.db can have (cut short, random, empty, another program's
database, half-written, values of the wrong kind) is put beside a good run, and
every verb of the CLI is run on it. Reading never changes the file. Run names
follow one rule in the run-config, the CLI and the dashboard.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from server.record.store import (
    DB_NAME,
    SCHEMA,
    CorruptRunError,
    RoundRecord,
    RunStore,
    RunStoreError,
)
from server.ui import cli
from server.ui.dashboard.views import validate_run_name as dashboard_validate_run_name
from task.config import ConfigError, parse_run_config
from task.names import RunNameError, find_run_name_problem
from tests.helpers import checkpointed_copy, execute, make_run, write_db


def edited(script: str) -> Callable[[Path, bytes], None]:
    def damage(run_dir: Path, good: bytes) -> None:
        make_run(run_dir.parent, run_dir.name).close()
        execute(run_dir, script)

    return damage


META = "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
# Damage that leaves nothing to read: every verb refuses the run.
DAMAGE: dict[str, Callable[[Path, bytes], None]] = {
    "empty": lambda d, good: write_db(d, b""),
    "random": lambda d, good: write_db(d, os.urandom(8192)),
    "truncated": lambda d, good: write_db(d, good[:3000]),
    "truncated-pages": lambda d, good: write_db(d, good[:8192]),
    "header-only": lambda d, good: write_db(d, good[:100]),
    "text-file": lambda d, good: write_db(d, b"run_name = exp1\nstate = running\n"),
    "foreign-schema": lambda d, good: execute(d, "CREATE TABLE t (x); INSERT INTO t VALUES (1);"),
    "no-version": lambda d, good: execute(d, META),
    "newer-version": lambda d, good: execute(
        d, META + "INSERT INTO meta VALUES ('schema_version', '9');"
    ),
    "text-version": lambda d, good: execute(
        d, META + "INSERT INTO meta VALUES ('schema_version', 'x');"
    ),
    "half-filled": lambda d, good: execute(
        d, META + "INSERT INTO meta VALUES ('schema_version', '2');"
    ),
    "tables-only": lambda d, good: execute(
        d, SCHEMA + "INSERT INTO meta VALUES ('schema_version', '2');"
    ),
    "no-run-row": edited("DELETE FROM run;"),
    "text-rounds-count": edited("UPDATE run SET num_rounds = 'many';"),
    "text-created-at": edited("UPDATE run SET created_at = 'yesterday';"),
    "dropped-column": edited("ALTER TABLE rounds DROP COLUMN note;"),
    "dropped-table": edited("DROP TABLE nodes;"),
}
# Damage to one table: verbs that read it refuse the run with one line, the others work.
PARTIAL_DAMAGE: dict[str, Callable[[Path, bytes], None]] = {
    "text-in-round": edited("UPDATE rounds SET accepted = 'some' WHERE round = 1;"),
    "blob-note": edited("UPDATE rounds SET note = x'00ff' WHERE round = 2;"),
    "blob-device": edited("UPDATE nodes SET device = x'fffe';"),
    "text-partition": edited("UPDATE nodes SET partition_id = 'zero';"),
}
VERBS: dict[str, list[str]] = {
    "status": ["status", "{}"],
    "status-json": ["status", "{}", "--json"],
    "watch": ["watch", "{}"],
    "nodes": ["nodes", "{}"],
    "export-csv": ["export", "{}", "--format", "csv"],
    "export-jsonl": ["export", "{}", "--format", "jsonl"],
    "plot": ["plot", "{}", "-o", "{out}"],
    "verify": ["verify", "{}"],
    "pause": ["pause", "{}"],
    "resume": ["resume", "{}"],
    "stop": ["stop", "{}"],
    "weight": ["weight", "{}", "0", "2.0"],
}


@pytest.fixture(scope="module")
def damaged_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run directory per kind of damage, made once for the module."""
    runs = tmp_path_factory.mktemp("damaged") / "runs"
    good = checkpointed_copy(tmp_path_factory.mktemp("source"))
    for name, damage in (DAMAGE | PARTIAL_DAMAGE).items():
        damage(runs / name, good)
    return runs


@pytest.fixture()
def runs_dir(tmp_path: Path, damaged_runs: Path) -> Path:
    """A good run beside a copy of each damaged run (a test may write to its copy)."""
    runs = tmp_path / "runs"
    shutil.copytree(damaged_runs, runs, symlinks=True)
    make_run(runs, "good").close()
    return runs


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def digests(run_dir: Path) -> dict[str, str]:
    """SHA-256 of run.db and of its WAL's content, what a reader must never change.

    A reader of a WAL database may create an empty ``-wal`` beside it (SQLite's
    way of reading one); the bytes of run.db and of the WAL's frames stay as they are.
    """
    wal = run_dir / f"{DB_NAME}-wal"
    return {
        DB_NAME: hashlib.sha256((run_dir / DB_NAME).read_bytes()).hexdigest(),
        "wal": hashlib.sha256(wal.read_bytes() if wal.exists() else b"").hexdigest(),
    }


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_every_verb_on_a_damaged_run_prints_one_line_and_exits_non_zero(
    runs_dir, tmp_path, capsys, damage
):
    # Prepare
    before = digests(runs_dir / damage)
    out_png = tmp_path / "plot.png"

    # Execute
    results = {
        verb: run_cli(
            capsys, "--runs-dir", runs_dir, *(a.format(damage, out=out_png) for a in args)
        )
        for verb, args in VERBS.items()
    }

    # Assert: one line on stderr naming the run and the problem; nothing written
    for verb, (code, out, err) in results.items():
        assert code != 0, (verb, out, err)
        assert out == "", (verb, out)
        assert err.count("\n") == 1 and err.startswith(f"fedcoord: run '{damage}' "), (verb, err)
        assert "Traceback" not in err
    assert "is unreadable: " in results["status"][2]
    assert not out_png.exists()
    assert digests(runs_dir / damage) == before


@pytest.mark.parametrize("damage", sorted(PARTIAL_DAMAGE))
def test_a_verb_reading_a_damaged_table_prints_one_line_the_others_work(
    runs_dir, tmp_path, capsys, damage
):
    # Prepare
    before = digests(runs_dir / damage)

    # Execute
    results = {
        verb: run_cli(
            capsys,
            "--runs-dir",
            runs_dir,
            *(a.format(damage, out=tmp_path / "p.png") for a in args),
        )
        for verb, args in VERBS.items()
    }

    # Assert: status reads every table; a refusal is one line, never a traceback
    assert results["status"][0] == 2
    for verb, (code, _, err) in results.items():
        if code != 0:
            assert err.count("\n") == 1 and err.startswith(f"fedcoord: run '{damage}' "), (
                verb,
                err,
            )
    assert digests(runs_dir / damage) == before


def test_runs_lists_each_damaged_run_as_unreadable_and_goes_on(runs_dir, capsys):
    # Execute
    code, out, err = run_cli(capsys, "--runs-dir", runs_dir, "runs")

    # Assert
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert code == 0 and err == ""
    assert rows["good"].split()[1] == "running"
    assert sorted(rows) == sorted([*DAMAGE, *PARTIAL_DAMAGE, "good"])
    for name in [*DAMAGE, *PARTIAL_DAMAGE]:
        assert rows[name].split()[1] == "unreadable", rows[name]


def test_the_newest_run_is_found_past_damaged_ones(runs_dir, capsys):
    # Execute
    code, out, _ = run_cli(capsys, "--runs-dir", runs_dir, "status", "--json")

    # Assert
    assert code == 0 and json.loads(out)["run_name"] == "good"


@pytest.mark.parametrize("damage", ["empty", "random", "foreign-schema", "half-filled"])
def test_the_store_raises_one_error_class_with_a_one_line_message(runs_dir, damage):
    # Execute / Assert: what the dashboard catches
    with pytest.raises(CorruptRunError) as error:
        RunStore(runs_dir / damage, readonly=True)
    assert isinstance(error.value, RunStoreError)
    assert str(error.value).startswith(f"run '{damage}' is unreadable: ")
    assert "\n" not in str(error.value) and error.value.problem in str(error.value)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("empty", "run.db is empty"),
        ("random", "run.db cannot be read (file is not a database)"),
        ("foreign-schema", "run.db is not a fedcoord run store (tables: t)"),
        ("newer-version", "run.db has schema version 9; this fedcoord reads versions 1 to 3"),
        ("text-version", "run.db has no valid schema version ('x')"),
        ("half-filled", "run.db has no table 'run' (half-written?)"),
        ("no-run-row", "run.db has 0 run rows, not 1"),
        ("text-rounds-count", "run.num_rounds holds 'many', not an integer"),
        ("blob-note", "rounds.note holds b'\\x00\\xff', not text"),
        ("dropped-column", "table rounds has no column 'note'"),
    ],
)
def test_each_problem_is_named(runs_dir, capsys, damage, problem):
    # Execute
    code, _, err = run_cli(capsys, "--runs-dir", runs_dir, "status", damage)

    # Assert
    assert code == 2 and err == f"fedcoord: run '{damage}' is unreadable: {problem}\n"


def test_reading_a_good_run_never_changes_its_files(tmp_path, capsys):
    # Prepare: a run whose server is gone, its WAL still holding rows
    store = make_run(tmp_path, "r1", state="completed")
    store.close()
    before = digests(tmp_path / "r1")

    # Execute
    for args in (["runs"], ["status", "r1"], ["nodes", "r1"], ["export", "r1"], ["verify", "r1"]):
        assert run_cli(capsys, "--runs-dir", tmp_path, *args)[0] == 0, args

    # Assert
    assert digests(tmp_path / "r1") == before


def test_a_foreign_database_is_not_turned_into_a_wal_database(tmp_path, capsys):
    # Prepare: another program's SQLite file in rollback-journal mode
    execute(tmp_path / "foreign", "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    before = (tmp_path / "foreign" / DB_NAME).read_bytes()

    # Execute
    for verb in ("status", "pause", "verify"):
        run_cli(capsys, "--runs-dir", tmp_path, verb, "foreign")

    # Assert: byte 18-19 of the header is the journal mode; nothing changed at all
    assert (tmp_path / "foreign" / DB_NAME).read_bytes() == before
    assert not (tmp_path / "foreign" / f"{DB_NAME}-wal").exists()


# ----------------------------------------------------------------- strict JSON
def test_status_json_and_export_are_strict_json_with_non_finite_values(tmp_path, capsys):
    # Prepare
    store = make_run(tmp_path, "odd")
    store.record_round(
        RoundRecord(
            3, 0.0, 2.0, 3, 2, 1, 0, True, {"central-loss": float("inf"), "x": float("nan")}, "h"
        )
    )
    store.close()
    execute(
        tmp_path / "odd",
        "UPDATE run SET heartbeat_at = 9e999; UPDATE rounds SET duration_s = -9e999;",
    )

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))

    # Execute
    _, status, _ = run_cli(capsys, "--runs-dir", tmp_path, "status", "odd", "--json")
    _, lines, _ = run_cli(capsys, "--runs-dir", tmp_path, "export", "odd", "--format", "jsonl")

    # Assert
    assert strict(status)["heartbeat_age_s"] is None
    assert strict(status)["metrics"]["central_loss"] is None
    records = [strict(line) for line in lines.splitlines()]
    assert records[-1]["metrics"] == {"central-loss": None, "x": None}
    assert records[-1]["duration_s"] is None


# ------------------------------------------------------------------ run names
NAMES = [
    "exp1",
    "run-20250101-120000-42",
    "a.b_c+d",
    "exp..1",
    "..",
    ".",
    ".hidden",
    "-rf",
    "a/b",
    "a\\b",
    "a\x00b",
    "tab\there",
    "x" * 101,
]


@pytest.mark.parametrize("name", NAMES)
def test_one_run_name_rule_for_config_cli_and_dashboard(tmp_path, capsys, name):
    # Prepare
    valid = find_run_name_problem(name) is None

    # Execute
    try:
        parse_run_config({"run-name": name})
        config_accepts = True
    except ConfigError:
        config_accepts = False
    try:
        dashboard_validate_run_name(name)
        dashboard_accepts = True
    except RunNameError:
        dashboard_accepts = False
    code, _, err = run_cli(capsys, "--runs-dir", tmp_path, "status", "--", name)

    # Assert
    assert config_accepts == dashboard_accepts == valid == (name in NAMES[:3])
    if not valid:
        assert code == 2 and err.startswith(f"fedcoord: invalid run name {name[:100]!r}: it ")


def test_a_link_out_of_the_runs_folder_is_refused_and_not_listed(tmp_path, capsys):
    # Prepare
    runs = tmp_path / "runs"
    make_run(tmp_path / "elsewhere", "secret").close()
    make_run(runs, "inside").close()
    (runs / "link").symlink_to(tmp_path / "elsewhere" / "secret")
    (runs / "alias").symlink_to(runs / "inside")

    # Execute
    listed = run_cli(capsys, "--runs-dir", runs, "runs")[1]
    refused = run_cli(capsys, "--runs-dir", runs, "status", "link")
    stopped = run_cli(capsys, "--runs-dir", runs, "stop", "link")
    alias = run_cli(capsys, "--runs-dir", runs, "status", "alias")

    # Assert
    assert "link" not in listed and "inside" in listed
    assert refused[0] == 2 and refused[2] == (
        f"fedcoord: run 'link' in {runs} is a link out of the runs folder; refused\n"
    )
    assert stopped[0] == 2 and RunStore(tmp_path / "elsewhere" / "secret").pending_commands() == []
    assert alias[0] == 0


def test_a_run_db_that_is_a_link_is_refused(tmp_path, capsys):
    # Prepare
    make_run(tmp_path / "elsewhere", "secret").close()
    (tmp_path / "runs" / "linked").mkdir(parents=True)
    (tmp_path / "runs" / "linked" / DB_NAME).symlink_to(tmp_path / "elsewhere" / "secret" / DB_NAME)

    # Execute
    code, _, err = run_cli(capsys, "--runs-dir", tmp_path / "runs", "status", "linked")

    # Assert
    assert code == 2 and "no run 'linked'" in err
    with pytest.raises(RunStoreError, match="is a link; refused"):
        RunStore(tmp_path / "runs" / "linked")


def test_output_that_cannot_be_written_is_one_line(tmp_path, capsys):
    # Prepare
    make_run(tmp_path, "r1").close()
    target = tmp_path / "missing-folder" / "rows.csv"

    # Execute
    code, _, err = run_cli(capsys, "--runs-dir", tmp_path, "export", "r1", "-o", target)

    # Assert
    assert code == 1 and err == f"fedcoord: {target}: No such file or directory\n"
