"""SQLite connections to ``run.db``: how they are opened, and transactions."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def connect(db_path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open a connection with a busy timeout, rows as mappings.

    ``readonly`` opens with SQLite's ``mode=ro``: nothing done through it can
    change the file. Neither mode changes the journal mode (:meth:`RunStore.create`
    sets WAL once; it stays with the file).
    """
    if readonly:
        uri = Path(db_path).absolute().as_uri() + "?mode=ro"
        connection = sqlite3.connect(uri, timeout=30.0, isolation_level=None, uri=True)
    else:
        connection = sqlite3.connect(db_path, timeout=30.0, isolation_level=None)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA busy_timeout=30000")
    if not readonly:
        connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def one_row(
    db: sqlite3.Connection, query: str, parameters: tuple[object, ...] = ()
) -> dict[str, object]:
    """The first row ``query`` selects, as a dict."""
    return dict(db.execute(query, parameters).fetchone())


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; ``ROLLBACK`` if the block raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
