"""The layout of ``run.db`` and the kinds of its values, checked on every read.

``run.db`` is read back as untrusted input: opening it checks the schema
version, every table and column, and the run row (:func:`check_layout`); every
read checks the kind of each value (:func:`checked_rows`). Anything else
(truncated, random or empty files, another program's database, a half-written
store, text where a number belongs) raises :class:`CorruptRunError` with one
line naming the run and the problem. Behind that check a row's values are of
their column's kind; :func:`int_value`, :func:`real_value` and
:func:`real_or_none` read them typed.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping
from pathlib import Path

SCHEMA_VERSION = 3
# Schema 2 (round rows chained; nodes, rejections and events not) is read, and
# migrated to schema 3 when its run is resumed (:mod:`server.record.migration`).
PREVIOUS_SCHEMA_VERSION = 2
# Schema 1 (chain over model hash, round and metrics only) is read, never written.
LEGACY_SCHEMA_VERSION = 1
READ_VERSIONS = (LEGACY_SCHEMA_VERSION, PREVIOUS_SCHEMA_VERSION, SCHEMA_VERSION)
DB_NAME = "run.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    run_name TEXT NOT NULL,
    state TEXT NOT NULL,
    num_rounds INTEGER NOT NULL,
    current_round INTEGER NOT NULL DEFAULT 0,
    phase TEXT NOT NULL DEFAULT '',
    replies_received INTEGER NOT NULL DEFAULT 0,
    replies_expected INTEGER NOT NULL DEFAULT 0,
    config_json TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    heartbeat_at REAL,
    server_pid INTEGER,
    flwr_run_id TEXT,
    message TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    duration_s REAL NOT NULL,
    sampled INTEGER NOT NULL,
    accepted INTEGER NOT NULL,
    rejected INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    train_loss REAL,
    central_loss REAL,
    central_accuracy REAL,
    federated_loss REAL,
    federated_accuracy REAL,
    metrics_json TEXT NOT NULL,
    model_hash TEXT NOT NULL,
    chain_hash TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    checkpoint_sha256 TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    partition_id INTEGER,
    num_examples INTEGER NOT NULL DEFAULT 0,
    device TEXT NOT NULL DEFAULT '',
    rounds_joined INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    weight REAL NOT NULL DEFAULT 1.0,
    last_seen REAL,
    last_error TEXT NOT NULL DEFAULT '',
    row_hash TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    chain_hash TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    command TEXT NOT NULL,
    argument TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    consumed_at REAL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    chain_hash TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS checkpoints (
    round INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    central_accuracy REAL,
    created_at REAL NOT NULL
);
"""

Kinds = type | tuple[type, ...]
"""The Python kinds a column's values may have (``isinstance``'s second argument)."""

# Columns each schema added; a store of an older version has all the others.
ADDED_IN_SCHEMA = {
    2: {"rounds": ("checkpoint_sha256",)},
    3: {"rejections": ("chain_hash",), "events": ("chain_hash",), "nodes": ("row_hash",)},
}
SQL_KINDS: dict[str, Kinds] = {"INTEGER": int, "REAL": (int, float), "TEXT": str}
_COLUMN = re.compile(r"^\s+(\w+) (INTEGER|REAL|TEXT)\b(.*?),?$")


class RunStoreError(RuntimeError):
    """The run store is missing, of another schema version, or inconsistent."""


class CorruptRunError(RunStoreError):
    """A ``run.db`` that cannot be read as a fedcoord run store; one line naming run and problem.

    Attributes
    ----------
    problem : str
        What is wrong, without the run's name.
    """

    def __init__(self, run_dir: Path, problem: str) -> None:
        self.problem = problem
        super().__init__(f"run {Path(run_dir).name!r} is unreadable: {problem}")


def _columns_of(schema: str) -> dict[str, dict[str, tuple[Kinds, bool]]]:
    """Table -> column -> (Python kinds of its values, whether NULL is allowed)."""
    tables: dict[str, dict[str, tuple[Kinds, bool]]] = {}
    current: dict[str, tuple[Kinds, bool]] = {}
    for line in schema.splitlines():
        if line.startswith("CREATE TABLE"):
            current = tables.setdefault(line.split()[5], {})
        elif match := _COLUMN.match(line):
            name, kind, rest = match.groups()
            current[name] = (SQL_KINDS[kind], "NOT NULL" not in rest and "PRIMARY KEY" not in rest)
    return tables


TABLE_COLUMNS = _columns_of(SCHEMA)


def check_layout(db: sqlite3.Connection, run_dir: Path) -> int:
    """The schema version of ``db``, after checking every table, column and the run row.

    Raises
    ------
    CorruptRunError
        If ``db`` is not a fedcoord run store of a version this fedcoord reads.
    sqlite3.Error
        If SQLite cannot read it.
    """
    listed = db.execute("SELECT name FROM sqlite_master WHERE type='table'")
    tables = {str(row[0]) for row in listed}
    if "meta" not in tables:
        found = ", ".join(sorted(tables)[:5]) or "none"
        raise CorruptRunError(run_dir, f"run.db is not a fedcoord run store (tables: {found})")
    version = _schema_version(db, run_dir)
    for table, columns in TABLE_COLUMNS.items():
        if table not in tables:
            raise CorruptRunError(run_dir, f"run.db has no table {table!r} (half-written?)")
        present = {str(r["name"]) for r in db.execute(f"PRAGMA table_info({table})")}
        needed = set(columns) - set(columns_added_after(version, table))
        missing = sorted(needed - present)
        if missing:
            raise CorruptRunError(run_dir, f"table {table} has no column {missing[0]!r}")
    checked_rows(run_dir, "run", db.execute("SELECT * FROM run WHERE id = 1").fetchall(), 1)
    return version


def columns_added_after(version: int, table: str) -> tuple[str, ...]:
    """The columns of ``table`` that schemas newer than ``version`` added."""
    newer = (added.get(table, ()) for v, added in ADDED_IN_SCHEMA.items() if v > version)
    return tuple(column for columns in newer for column in columns)


def _schema_version(db: sqlite3.Connection, run_dir: Path) -> int:
    row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    text = row["value"] if row is not None else None
    if not (isinstance(text, str) and text.isascii() and text.isdigit() and len(text) < 6):
        raise CorruptRunError(run_dir, f"run.db has no valid schema version ({_show(text)})")
    version = int(text)
    if version not in READ_VERSIONS:
        raise CorruptRunError(
            run_dir,
            f"run.db has schema version {version}; this fedcoord reads versions "
            f"{READ_VERSIONS[0]} to {READ_VERSIONS[-1]}",
        )
    return version


def checked_rows(
    run_dir: Path, table: str, rows: list[sqlite3.Row], exactly: int | None = None
) -> list[dict[str, object]]:
    """``rows`` of ``table`` as dicts after checking the kind of every value.

    Raises
    ------
    CorruptRunError
        If a value is not of its column's kind, or there are not ``exactly`` rows.
    """
    if exactly is not None and len(rows) != exactly:
        raise CorruptRunError(run_dir, f"run.db has {len(rows)} {table} rows, not {exactly}")
    checked = [dict(row) for row in rows]
    for row in checked:
        problem = find_value_problem(table, row)
        if problem is not None:
            raise CorruptRunError(run_dir, problem)
    return checked


def find_value_problem(table: str, row: Mapping[str, object]) -> str | None:
    """The first value of ``row`` (of ``table``) that is not of its column's kind, or None."""
    for name, (kinds, nullable) in TABLE_COLUMNS[table].items():
        if name not in row:
            continue  # a store of an older schema lacks the columns newer ones added
        value = row[name]
        if value is None and nullable:
            continue
        if not isinstance(value, kinds):
            return f"{table}.{name} holds {_show(value)}, not {_kind_name(kinds)}"
    return None


def int_value(row: Mapping[str, object], name: str) -> int:
    """``row[name]``, a checked row's INTEGER value, typed.

    Raises
    ------
    TypeError
        If the value is not an integer (a row that skipped :func:`checked_rows`).
    """
    value = row[name]
    if not isinstance(value, int):
        raise TypeError(f"{name} holds {_show(value)}, not {_kind_name(int)}")
    return value


def real_value(row: Mapping[str, object], name: str) -> float:
    """``row[name]``, a checked row's REAL value (NOT NULL), as a float.

    Raises
    ------
    TypeError
        If the value is not a number (a row that skipped :func:`checked_rows`).
    """
    value = real_or_none(row, name)
    if value is None:
        raise TypeError(f"{name} holds None, not {_kind_name((int, float))}")
    return value


def real_or_none(row: Mapping[str, object], name: str) -> float | None:
    """``row[name]``, a checked row's REAL value, as a float (NULL: None).

    Raises
    ------
    TypeError
        If the value is neither a number nor NULL (a row that skipped :func:`checked_rows`).
    """
    value = row[name]
    if value is None:
        return None
    if not isinstance(value, int | float):
        raise TypeError(f"{name} holds {_show(value)}, not {_kind_name((int, float))}")
    return float(value)


def _kind_name(kinds: Kinds) -> str:
    if kinds is int:
        return "an integer"
    return "text" if kinds is str else "a number"


def _show(value: object, limit: int = 60) -> str:
    """A value as one short line, for messages about what a file holds."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def stored_number(value: object, *, allow_inf: bool = False) -> float | None:
    """A number read back from a stored JSON text, as a float; None if it is not one.

    JSON holds integers of any size: one beyond a float's range (an edited row's
    400-digit "epsilon") is not a number anyone recorded, so it reads as missing
    instead of raising ``OverflowError``; so do NaN, booleans, non-numbers and,
    unless ``allow_inf``, infinities.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    if number != number or (number in (float("inf"), float("-inf")) and not allow_inf):
        return None
    return number
