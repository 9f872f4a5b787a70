"""The run store: one SQLite database (WAL) per run directory.

It is the only channel between the running ServerApp (the writer) and the
control CLI (a reader that also queues commands). WAL mode lets the CLI read
while the server writes; every write is one short transaction.

``run.db`` is read back as untrusted input (:mod:`server.record.schema`: every
table, column and value is checked; readers open it read-only, ``mode=ro``, and
never change it). Its round, rejection and event rows are chained and its node
rows hashed (:mod:`server.record.chain`), each write with its head in one
transaction. Schema 2 stores (older fedcoord) are read as they are and migrated
by the first write of a resumed run (:mod:`server.record.migration`); schema 1
stores stay readable, not writable.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from server.record.chain import (
    GENESIS_HASH,
    append_linked,
    genesis_hash,
    link_round,
    parse_heads,
    rehash_nodes,
    write_empty_heads,
    write_rounds_head,
)
from server.record.connection import connect, one_row, transaction
from server.record.migration import migrate_to_current
from server.record.schema import (
    DB_NAME,
    LEGACY_SCHEMA_VERSION,
    PREVIOUS_SCHEMA_VERSION,
    SCHEMA,
    SCHEMA_VERSION,
    CorruptRunError,
    RunStoreError,
    check_layout,
    checked_rows,
    int_value,
)

if TYPE_CHECKING:  # the store itself never reads checkpoint files (nor imports numpy)
    from server.record.checkpoints import SavedCheckpoint

T = TypeVar("T")
HEARTBEAT_INTERVAL_S = 1.0


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


class RunStore:
    """Read and write one run's ``run.db``.

    Parameters
    ----------
    run_dir : Path
        The run directory; ``run.db`` lives inside it.
    readonly : bool
        Open with SQLite's ``mode=ro`` (every reader: CLI, dashboard, verify).
        Writable, a schema 2 store is opened as it is and migrated to schema 3 by
        the first write to a chained table (a resumed server's first event or node
        write), never by opening it or queueing a command: a run still served by
        an older fedcoord keeps the schema its server writes.

    Raises
    ------
    RunStoreError
        If there is no ``run.db``, or (writing) it was recorded by a fedcoord of schema 1.
    CorruptRunError
        If ``run.db`` is not a fedcoord run store one of these versions can read.
    """

    def __init__(self, run_dir: Path, *, readonly: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.db_path = self.run_dir / DB_NAME
        self.readonly = readonly
        if self.db_path.is_symlink():
            raise RunStoreError(f"run {self.run_dir.name!r}: {self.db_path} is a link; refused")
        if not self.db_path.is_file():
            raise RunStoreError(f"no run store at {self.db_path}")
        if self.db_path.stat().st_size == 0:
            raise CorruptRunError(self.run_dir, "run.db is empty")
        try:
            self._db = connect(self.db_path, readonly=readonly)
        except sqlite3.Error as error:
            raise CorruptRunError(self.run_dir, f"run.db cannot be opened ({error})") from None
        try:
            self.schema_version = self._read(lambda: check_layout(self._db, self.run_dir))
        except BaseException:
            self._db.close()
            raise
        if not readonly and self.schema_version == LEGACY_SCHEMA_VERSION:
            self._db.close()
            raise RunStoreError(
                f"run {self.run_dir.name!r} was recorded by an older fedcoord (run.db schema "
                f"{self.schema_version}); this version reads it but does not change it: "
                "start a new run"
            )

    @classmethod
    def create(
        cls, run_dir: Path, run_name: str, config: Mapping[str, object], num_rounds: int
    ) -> RunStore:
        """Create the run directory and a fresh store in state ``running``.

        Raises
        ------
        RunStoreError
            If ``run_dir`` is a link that leads out of its parent (the runs folder).
        """
        if run_dir.is_symlink() and run_dir.resolve().parent != run_dir.parent.resolve():
            raise RunStoreError(
                f"run {run_dir.name!r}: {run_dir} is a link to {run_dir.resolve()}, outside the "
                "runs folder; refused"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        db = connect(run_dir / DB_NAME)
        db.execute("PRAGMA journal_mode=WAL")
        now = time.time()
        db.executescript(SCHEMA)
        with transaction(db):
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            db.execute(
                "INSERT INTO run (id, run_name, state, num_rounds, config_json, created_at,"
                " updated_at) VALUES (1, ?, 'running', ?, ?, ?, ?)",
                (run_name, num_rounds, json.dumps(dict(config), default=str), now, now),
            )
            write_empty_heads(db, genesis_hash(one_row(db, "SELECT * FROM run WHERE id = 1")))
        db.close()
        return cls(run_dir)

    def _read(self, read: Callable[[], T]) -> T:
        """``read()``, an SQLite error raised as :class:`CorruptRunError`."""
        try:
            return read()
        except sqlite3.Error as error:
            reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
            raise CorruptRunError(self.run_dir, f"run.db cannot be read ({reason})") from None

    def _select(
        self, table: str, query: str, parameters: tuple[object, ...] = ()
    ) -> list[dict[str, object]]:
        def select() -> list[dict[str, object]]:
            rows = self._db.execute(query, parameters).fetchall()
            return checked_rows(self.run_dir, table, rows)

        return self._read(select)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    @contextmanager
    def one_view(self) -> Iterator[None]:
        """Reads inside it see one state of ``run.db``, however the server writes meanwhile."""
        self._read(lambda: self._db.execute("BEGIN"))
        try:
            yield
        finally:
            self._db.execute("COMMIT")

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
        """Append a line to the event log, chained, with its head."""
        with self._chained_write() as genesis:
            values = {"at": time.time(), "kind": kind, "message": message}
            append_linked(self._db, "events", values, genesis)

    @contextmanager
    def _chained_write(self) -> Iterator[str]:
        """A transaction that writes a chained table; yields the run's genesis hash.

        A schema 2 store is migrated to schema 3 first, in the same transaction.
        """
        with transaction(self._db):
            version = self._db.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()[0]
            genesis = self.genesis()
            migrating = version == str(PREVIOUS_SCHEMA_VERSION)
            if migrating:
                migrate_to_current(self._db, genesis)
            yield genesis
        if migrating:
            self.schema_version = SCHEMA_VERSION

    def record_round(self, record: RoundRecord, checkpoint: SavedCheckpoint | None = None) -> str:
        """Insert a completed round, chained to the previous row; return its chain hash.

        The round row, its checkpoint row (file name and SHA-256) and the chain head
        are written in one transaction: all are on record or none is. The hash is
        computed from the row as SQLite stores it (read back), so a reader
        recomputes exactly the same value.
        """
        values = {
            "round": record.round,
            "started_at": record.started_at,
            "ended_at": record.ended_at,
            "duration_s": record.ended_at - record.started_at,
            "sampled": record.sampled,
            "accepted": record.accepted,
            "rejected": record.rejected,
            "failed": record.failed,
            "updated": int(record.updated),
            "train_loss": record.metrics.get("train-loss"),
            "central_loss": record.metrics.get("central-loss"),
            "central_accuracy": record.metrics.get("central-accuracy"),
            "federated_loss": record.metrics.get("federated-loss"),
            "federated_accuracy": record.metrics.get("federated-accuracy"),
            "metrics_json": json.dumps(dict(record.metrics), sort_keys=True),
            "model_hash": record.model_hash,
            "chain_hash": "",
            "note": record.note,
            "checkpoint_sha256": checkpoint.sha256 if checkpoint is not None else "",
        }
        with transaction(self._db):
            if checkpoint is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                    (
                        record.round,
                        checkpoint.path.name,
                        checkpoint.sha256,
                        record.metrics.get("central-accuracy"),
                        time.time(),
                    ),
                )
            self._db.execute(
                f"INSERT OR REPLACE INTO rounds ({', '.join(values)})"
                f" VALUES ({', '.join('?' * len(values))})",
                tuple(values.values()),
            )
            link = link_round(self._db, record.round, self.genesis())
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
        with self._chained_write() as genesis:
            self._ensure_node(node_id)
            self._db.execute(
                "UPDATE nodes SET partition_id = COALESCE(?, partition_id),"
                " num_examples = COALESCE(?, num_examples), device = COALESCE(?, device),"
                " weight = COALESCE(?, weight), rounds_joined = rounds_joined + ?, last_seen = ?"
                " WHERE node_id = ?",
                (
                    partition_id,
                    num_examples,
                    device,
                    weight,
                    int(joined),
                    time.time(),
                    str(node_id),
                ),
            )
            rehash_nodes(self._db, genesis, "node_id = ?", (str(node_id),))

    def record_node_fault(self, node_id: int, server_round: int, kind: str, reason: str) -> None:
        """Count a failure (``kind='failure'``) or a rejected update against a node."""
        column = "failures" if kind == "failure" else "rejected"
        with self._chained_write() as genesis:
            self._ensure_node(node_id)
            self._db.execute(
                f"UPDATE nodes SET {column} = {column} + 1, last_error = ? WHERE node_id = ?",
                (reason[:500], str(node_id)),
            )
            rehash_nodes(self._db, genesis, "node_id = ?", (str(node_id),))
            rejection = {
                "round": server_round,
                "node_id": str(node_id),
                "kind": kind,
                "reason": reason[:2000],
                "at": time.time(),
            }
            append_linked(self._db, "rejections", rejection, genesis)

    def add_command(self, command: str, argument: str = "") -> int:
        """Queue an operator command for the server; return its id."""
        cursor = self._db.execute(
            "INSERT INTO commands (command, argument, created_at) VALUES (?, ?, ?)",
            (command, argument, time.time()),
        )
        return int(cursor.lastrowid or 0)

    def drop_pending_commands(self) -> list[str]:
        """Consume every queued command without acting on it; return their names.

        On resume: commands queued for a server that is gone (a ``stop`` that
        came after it died) must not act on the resumed run.
        """
        dropped = self.pending_commands()
        for command in dropped:
            self.consume_command(int_value(command, "id"))
        return [str(command["command"]) for command in dropped]

    def consume_command(self, command_id: int) -> None:
        """Mark a command as acted on."""
        self._db.execute(
            "UPDATE commands SET consumed_at = ? WHERE id = ?", (time.time(), command_id)
        )

    def set_partition_weight(self, partition_id: int, weight: float) -> None:
        """Record the operator weight of every node serving ``partition_id``."""
        with self._chained_write() as genesis:
            self._db.execute(
                "UPDATE nodes SET weight = ? WHERE partition_id = ?", (weight, partition_id)
            )
            rehash_nodes(self._db, genesis, "partition_id = ?", (partition_id,))

    def forget_checkpoint(self, server_round: int) -> None:
        """Drop the checkpoint row of a pruned file."""
        self._db.execute("DELETE FROM checkpoints WHERE round = ?", (server_round,))

    def truncate_after(self, server_round: int) -> int:
        """Delete round and checkpoint rows after ``server_round``; return rows deleted."""
        with transaction(self._db):
            cursor = self._db.execute("DELETE FROM rounds WHERE round > ?", (server_round,))
            self._db.execute("DELETE FROM checkpoints WHERE round > ?", (server_round,))
            write_rounds_head(self._db, self.genesis())
            self.update_run(current_round=max(server_round, 0))
        return cursor.rowcount

    def _ensure_node(self, node_id: int) -> None:
        self._db.execute("INSERT OR IGNORE INTO nodes (node_id) VALUES (?)", (str(node_id),))

    # ------------------------------------------------------------------- reads
    def run_row(self) -> dict[str, object]:
        """The single ``run`` row as a dict."""
        return self._select("run", "SELECT * FROM run WHERE id = 1")[0]

    def rounds(self) -> list[dict[str, object]]:
        """Every round row, oldest first."""
        return self._select("rounds", "SELECT * FROM rounds ORDER BY round")

    def nodes(self) -> list[dict[str, object]]:
        """Every known node, by partition id."""
        query = "SELECT * FROM nodes ORDER BY partition_id IS NULL, partition_id, node_id"
        return self._select("nodes", query)

    def events(self, limit: int = 50) -> list[dict[str, object]]:
        """The latest events, oldest first."""
        rows = self._select("events", "SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return rows[::-1]

    def events_of_kind(self, kind: str, limit: int = 50) -> list[dict[str, object]]:
        """The latest events of one kind, oldest first."""
        query = "SELECT * FROM events WHERE kind = ? ORDER BY id DESC LIMIT ?"
        return self._select("events", query, (kind, limit))[::-1]

    def rejections(self, limit: int = 50) -> list[dict[str, object]]:
        """The latest rejected updates and failures with their reasons, newest first."""
        query = "SELECT * FROM rejections ORDER BY id DESC LIMIT ?"
        return self._select("rejections", query, (limit,))

    def checkpoints(self) -> list[dict[str, object]]:
        """Checkpoint rows, oldest round first."""
        return self._select("checkpoints", "SELECT * FROM checkpoints ORDER BY round")

    def pending_commands(self) -> list[dict[str, object]]:
        """Commands not yet consumed, oldest first."""
        query = "SELECT * FROM commands WHERE consumed_at IS NULL ORDER BY id"
        return self._select("commands", query)

    def genesis(self) -> str:
        """The link before the first round row: bound to this run (schema 1: zeros)."""
        if self.schema_version == LEGACY_SCHEMA_VERSION:
            return GENESIS_HASH
        return genesis_hash(self.run_row())

    def chain_head(self) -> dict[str, object] | None:
        """The recorded chain head ``{"round", "hash", "rows"}``; None if absent or malformed."""
        return self.heads()["rounds"]

    def heads(self) -> dict[str, dict[str, object] | None]:
        """Every recorded head by table, and the migration marker; None if absent or malformed.

        ``rounds``: ``{"round", "hash", "rows"}``; ``rejections``, ``events``:
        ``{"id", "hash", "rows"}``; ``nodes``: ``{"rows", "hash"}``; ``migrated``: what a
        migration from schema 2 chained at once (None if this store was not migrated).
        """
        values = dict(
            self._read(lambda: self._db.execute("SELECT key, value FROM meta").fetchall())
        )
        return parse_heads(values)

    def chained_rows(self, table: str) -> list[dict[str, object]]:
        """Every row of the append-only ``table`` (``rejections``, ``events``), oldest first."""
        return self._select(table, f"SELECT * FROM {table} ORDER BY id")
