"""The run store: one SQLite database (WAL) per run directory.

It is the only channel between the running ServerApp (the writer) and the
control CLI (a reader that also queues commands). WAL mode lets the CLI read
while the server writes; every write is one short transaction.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
DB_NAME = "run.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
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
    note TEXT NOT NULL DEFAULT ''
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
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
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
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    round INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    central_accuracy REAL,
    created_at REAL NOT NULL
);
"""

GENESIS_HASH = "0" * 64
HEARTBEAT_INTERVAL_S = 1.0


class RunStoreError(RuntimeError):
    """The run store is missing, of another schema version, or inconsistent."""


@dataclass(frozen=True)
class RoundRecord:
    """One completed round, as written to the ``rounds`` table."""

    round: int
    started_at: float
    ended_at: float
    sampled: int
    accepted: int
    rejected: int
    failed: int
    updated: bool
    metrics: Mapping[str, float]
    model_hash: str
    note: str = ""


def chain_hash(previous: str, model_hash: str, server_round: int, metrics_json: str) -> str:
    """Hash linking a round row to the one before it."""
    payload = f"{previous}|{model_hash}|{server_round}|{metrics_json}".encode()
    return hashlib.sha256(payload).hexdigest()


def connect(db_path: Path) -> sqlite3.Connection:
    """Open a connection in WAL mode with a busy timeout, rows as mappings."""
    connection = sqlite3.connect(db_path, timeout=30.0, isolation_level=None)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA busy_timeout=30000")
    return connection


class RunStore:
    """Read and write one run's ``run.db``.

    Parameters
    ----------
    run_dir : Path
        The run directory; ``run.db`` lives inside it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.db_path = self.run_dir / DB_NAME
        if not self.db_path.exists():
            raise RunStoreError(f"no run store at {self.db_path}")
        self._db = connect(self.db_path)
        version = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if version is None or int(version["value"]) != SCHEMA_VERSION:
            raise RunStoreError(
                f"{self.db_path} has schema version {version and version['value']}, "
                f"this fedcoord reads version {SCHEMA_VERSION}"
            )

    @classmethod
    def create(
        cls, run_dir: Path, run_name: str, config: Mapping[str, object], num_rounds: int
    ) -> RunStore:
        """Create the run directory and a fresh store in state ``running``."""
        run_dir.mkdir(parents=True, exist_ok=True)
        db = connect(run_dir / DB_NAME)
        now = time.time()
        db.executescript(SCHEMA)
        with _transaction(db):
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            db.execute(
                "INSERT INTO run (id, run_name, state, num_rounds, config_json, created_at,"
                " updated_at) VALUES (1, ?, 'running', ?, ?, ?, ?)",
                (run_name, num_rounds, json.dumps(dict(config), default=str), now, now),
            )
        db.close()
        return cls(run_dir)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    # ------------------------------------------------------------------ writes
    def update_run(self, **columns: object) -> None:
        """Set columns of the single ``run`` row (and ``updated_at``)."""
        columns["updated_at"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in columns)
        self._db.execute(f"UPDATE run SET {assignments} WHERE id = 1", tuple(columns.values()))

    def set_progress(self, phase: str, received: int, expected: int) -> None:
        """Record what the server is doing and how many replies are in."""
        self.update_run(phase=phase, replies_received=received, replies_expected=expected)

    def start_heartbeat(self, interval_s: float = HEARTBEAT_INTERVAL_S) -> threading.Event:
        """Beat ``heartbeat_at`` from a daemon thread until the returned event is set.

        A thread of its own keeps beating while the main loop trains, evaluates or
        waits, so a stale heartbeat means the process is gone, not busy.
        """
        stop = threading.Event()

        def beat() -> None:
            db = connect(self.db_path)
            try:
                while not stop.is_set():
                    db.execute("UPDATE run SET heartbeat_at = ? WHERE id = 1", (time.time(),))
                    stop.wait(interval_s)
            finally:
                db.close()

        threading.Thread(target=beat, name="fedcoord-heartbeat", daemon=True).start()
        return stop

    def add_event(self, kind: str, message: str) -> None:
        """Append a line to the event log."""
        self._db.execute(
            "INSERT INTO events (at, kind, message) VALUES (?, ?, ?)", (time.time(), kind, message)
        )

    def record_round(self, record: RoundRecord, checkpoint: tuple[Path, str] | None = None) -> str:
        """Insert a completed round, chained to the previous row; return its chain hash.

        The round row and its checkpoint row (``(path, sha256)``) are written in
        one transaction: either both are on record or neither is.
        """
        metrics_json = json.dumps(dict(record.metrics), sort_keys=True)
        with _transaction(self._db):
            if checkpoint is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                    (
                        record.round,
                        checkpoint[0].name,
                        checkpoint[1],
                        record.metrics.get("central-accuracy"),
                        time.time(),
                    ),
                )
            previous = self._db.execute(
                "SELECT chain_hash FROM rounds WHERE round < ? ORDER BY round DESC LIMIT 1",
                (record.round,),
            ).fetchone()
            link = chain_hash(
                previous["chain_hash"] if previous else GENESIS_HASH,
                record.model_hash,
                record.round,
                metrics_json,
            )
            self._db.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    record.round,
                    record.started_at,
                    record.ended_at,
                    record.ended_at - record.started_at,
                    record.sampled,
                    record.accepted,
                    record.rejected,
                    record.failed,
                    int(record.updated),
                    record.metrics.get("train-loss"),
                    record.metrics.get("central-loss"),
                    record.metrics.get("central-accuracy"),
                    record.metrics.get("federated-loss"),
                    record.metrics.get("federated-accuracy"),
                    metrics_json,
                    record.model_hash,
                    link,
                    record.note,
                ),
            )
            self.update_run(current_round=record.round)
        return link

    def record_node_reply(  # noqa: PLR0913
        self,
        node_id: int,
        *,
        partition_id: int | None = None,
        num_examples: int | None = None,
        device: str | None = None,
        weight: float | None = None,
        joined: bool = False,
    ) -> None:
        """Upsert a node after a reply: what it reported and that it was seen."""
        self._ensure_node(node_id)
        self._db.execute(
            "UPDATE nodes SET partition_id = COALESCE(?, partition_id),"
            " num_examples = COALESCE(?, num_examples), device = COALESCE(?, device),"
            " weight = COALESCE(?, weight), rounds_joined = rounds_joined + ?, last_seen = ?"
            " WHERE node_id = ?",
            (partition_id, num_examples, device, weight, int(joined), time.time(), str(node_id)),
        )

    def record_node_fault(self, node_id: int, server_round: int, kind: str, reason: str) -> None:
        """Count a failure (``kind='failure'``) or a rejected update against a node."""
        column = "failures" if kind == "failure" else "rejected"
        self._ensure_node(node_id)
        with _transaction(self._db):
            self._db.execute(
                f"UPDATE nodes SET {column} = {column} + 1, last_error = ? WHERE node_id = ?",
                (reason[:500], str(node_id)),
            )
            self._db.execute(
                "INSERT INTO rejections (round, node_id, kind, reason, at) VALUES (?,?,?,?,?)",
                (server_round, str(node_id), kind, reason[:2000], time.time()),
            )

    def add_command(self, command: str, argument: str = "") -> int:
        """Queue an operator command for the server; return its id."""
        cursor = self._db.execute(
            "INSERT INTO commands (command, argument, created_at) VALUES (?, ?, ?)",
            (command, argument, time.time()),
        )
        return int(cursor.lastrowid or 0)

    def pending_commands(self) -> list[dict[str, object]]:
        """Commands not yet consumed, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM commands WHERE consumed_at IS NULL ORDER BY id"
        ).fetchall()
        return [dict(r) for r in rows]

    def consume_command(self, command_id: int) -> None:
        """Mark a command as acted on."""
        self._db.execute(
            "UPDATE commands SET consumed_at = ? WHERE id = ?", (time.time(), command_id)
        )

    def set_partition_weight(self, partition_id: int, weight: float) -> None:
        """Record the operator weight of every node serving ``partition_id``."""
        self._db.execute(
            "UPDATE nodes SET weight = ? WHERE partition_id = ?", (weight, partition_id)
        )

    def checkpoints(self) -> list[dict[str, object]]:
        """Checkpoint rows, oldest round first."""
        rows = self._db.execute("SELECT * FROM checkpoints ORDER BY round").fetchall()
        return [dict(r) for r in rows]

    def forget_checkpoint(self, server_round: int) -> None:
        """Drop the checkpoint row of a pruned file."""
        self._db.execute("DELETE FROM checkpoints WHERE round = ?", (server_round,))

    def truncate_after(self, server_round: int) -> int:
        """Delete round and checkpoint rows after ``server_round``; return rows deleted."""
        with _transaction(self._db):
            cursor = self._db.execute("DELETE FROM rounds WHERE round > ?", (server_round,))
            self._db.execute("DELETE FROM checkpoints WHERE round > ?", (server_round,))
            self.update_run(current_round=server_round)
        return cursor.rowcount

    def _ensure_node(self, node_id: int) -> None:
        self._db.execute("INSERT OR IGNORE INTO nodes (node_id) VALUES (?)", (str(node_id),))

    # ------------------------------------------------------------------- reads
    def run_row(self) -> dict[str, object]:
        """The single ``run`` row as a dict."""
        return dict(self._db.execute("SELECT * FROM run WHERE id = 1").fetchone())

    def rounds(self) -> list[dict[str, object]]:
        """Every round row, oldest first."""
        return [dict(r) for r in self._db.execute("SELECT * FROM rounds ORDER BY round")]

    def nodes(self) -> list[dict[str, object]]:
        """Every known node, by partition id."""
        query = "SELECT * FROM nodes ORDER BY partition_id IS NULL, partition_id, node_id"
        return [dict(r) for r in self._db.execute(query)]

    def events(self, limit: int = 50) -> list[dict[str, object]]:
        """The latest events, oldest first."""
        rows = self._db.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(r) for r in reversed(rows.fetchall())]


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
