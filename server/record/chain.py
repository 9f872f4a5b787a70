"""Tamper evidence of ``run.db``: hash chains over its tables, and their heads.

Since schema 2 each round row carries a hash chained over every other column of
the row and the previous row's hash, starting from a genesis hash bound to the
run (name, creation time, config). The newest row's round and hash are kept
apart as the chain head (``meta``), written in the same transaction as the row,
so deleting the newest rows is noticed too. Schema 1 (older fedcoord) chained
only a row's model hash, round and metrics, from a genesis of zeros.

Schema 3 binds the other tables an operator reads to judge a run, from the same
genesis. ``rejections`` and ``events`` are append-only: each row is chained like
a round row, with a head (newest id, its hash, number of rows) per table.
``nodes`` rows change in place: each carries a hash over its own columns, and a
digest of every node row's hash is kept as the nodes head; every node write
rewrites both in its transaction. :func:`record_head` folds all heads into the
one value ``fedcoord verify`` prints.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Mapping

GENESIS_HASH = "0" * 64  # the first link of a schema 1 chain
CHAIN_FORMAT = "fedcoord-chain-2"
CHAIN_HEAD_KEY = "chain_head"
LINK_FORMAT = "fedcoord-chain-3"
# Append-only tables chained row by row (schema 3), and the meta key of each one's head.
LINKED_TABLES = ("rejections", "events")
TABLE_HEAD_KEYS = {"rejections": "rejections_head", "events": "events_head"}
NODES_HEAD_KEY = "nodes_head"
# What a migration from schema 2 chained at once (rows written before it was chained).
MIGRATED_KEY = "migrated"


def legacy_chain_hash(previous: str, model_hash: str, server_round: int, metrics_json: str) -> str:
    """Hash linking a schema 1 round row to the one before it (three of its columns)."""
    payload = f"{previous}|{model_hash}|{server_round}|{metrics_json}".encode()
    return hashlib.sha256(payload).hexdigest()


def chain_hash(previous: str, row: Mapping[str, object]) -> str:
    """Hash linking a round row to the one before it: every column but ``chain_hash``.

    The values are encoded with their kinds (1, 1.0 and "1" differ; floats exactly,
    by their shortest round-trip form), so any edit of any stored value changes it.
    """
    fields = [[name, _canonical(row[name])] for name in sorted(row) if name != "chain_hash"]
    payload = json.dumps([CHAIN_FORMAT, previous, fields], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def genesis_hash(run: Mapping[str, object]) -> str:
    """The link before the first round row, bound to the run's name, creation time and config."""
    fields = [_canonical(run[key]) for key in ("run_name", "created_at", "config_json")]
    payload = json.dumps([CHAIN_FORMAT, "genesis", fields], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def link_hash(table: str, previous: str, row: Mapping[str, object]) -> str:
    """Hash linking a row of an append-only ``table`` to the one before it.

    It covers every column but ``chain_hash``, the id too, so rows cannot trade places.
    """
    fields = [[name, _canonical(row[name])] for name in sorted(row) if name != "chain_hash"]
    payload = json.dumps([LINK_FORMAT, table, previous, fields], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def node_hash(genesis: str, row: Mapping[str, object]) -> str:
    """Hash of one node row: every column but ``row_hash``, bound to the run's genesis."""
    fields = [[name, _canonical(row[name])] for name in sorted(row) if name != "row_hash"]
    payload = json.dumps([LINK_FORMAT, "nodes", genesis, fields], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def nodes_digest(genesis: str, row_hashes: Iterable[str]) -> str:
    """Digest of every node row's hash (each binds its node id), in sorted order."""
    payload = json.dumps(
        [LINK_FORMAT, "nodes-head", genesis, sorted(row_hashes)], separators=(",", ":")
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def record_head(heads: Mapping[str, object]) -> str:
    """One value standing for every head (and a migration marker): what an operator keeps."""
    payload = json.dumps([LINK_FORMAT, "record-head", heads], separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _canonical(value: object) -> object:
    if isinstance(value, bytes):
        return {"blob": value.hex()}
    return [type(value).__name__, value]


def write_head(db: sqlite3.Connection, server_round: int | None, link: str, rows: int) -> None:
    """Record the chain head: the newest row's round and hash, and the number of rows."""
    head = json.dumps({"round": server_round, "hash": link, "rows": rows})
    db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (CHAIN_HEAD_KEY, head))


def link_round(db: sqlite3.Connection, server_round: int, genesis: str) -> str:
    """Chain the stored round row ``server_round`` to the row before it; rewrite the head.

    Call it inside the transaction that wrote the row. The hash is computed from
    the row as SQLite stores it (read back), so a reader recomputes the same value.
    """
    stored = dict(db.execute("SELECT * FROM rounds WHERE round = ?", (server_round,)).fetchone())
    before = db.execute(
        "SELECT chain_hash FROM rounds WHERE round < ? ORDER BY round DESC LIMIT 1",
        (server_round,),
    ).fetchone()
    link = chain_hash(str(before[0]) if before is not None else genesis, stored)
    db.execute("UPDATE rounds SET chain_hash = ? WHERE round = ?", (link, server_round))
    write_rounds_head(db, genesis)
    return link


def write_rounds_head(db: sqlite3.Connection, genesis: str) -> None:
    """Record the newest round row's round and hash, and the number of rows, as the head."""
    count = int(db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
    last = db.execute("SELECT round, chain_hash FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
    if last is None:
        write_head(db, None, genesis, 0)
    else:
        write_head(db, int(last[0]), str(last[1]), count)


def write_empty_heads(db: sqlite3.Connection, genesis: str) -> None:
    """The heads of a new store: no rows in any chained table."""
    write_rounds_head(db, genesis)
    for table in LINKED_TABLES:
        write_table_head(db, table)
    write_nodes_head(db, genesis)


def append_linked(
    db: sqlite3.Connection, table: str, values: Mapping[str, object], genesis: str
) -> str:
    """Insert a row into the append-only ``table``, chained, and rewrite its head.

    Call it inside a transaction. The hash is computed from the row as SQLite
    stores it (read back), so a reader recomputes exactly the same value.
    """
    names = ", ".join(values)
    cursor = db.execute(
        f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(values))})",
        tuple(values.values()),
    )
    row_id = int(cursor.lastrowid or 0)
    stored = dict(db.execute(f"SELECT * FROM {table} WHERE id = ?", (row_id,)).fetchone())
    before = db.execute(
        f"SELECT chain_hash FROM {table} WHERE id < ? ORDER BY id DESC LIMIT 1", (row_id,)
    ).fetchone()
    link = link_hash(table, str(before[0]) if before is not None else genesis, stored)
    db.execute(f"UPDATE {table} SET chain_hash = ? WHERE id = ?", (link, row_id))
    write_table_head(db, table)
    return link


def write_table_head(db: sqlite3.Connection, table: str) -> None:
    """Record the newest row's id and hash, and the number of rows, of the append-only ``table``."""
    count = int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    last = db.execute(f"SELECT id, chain_hash FROM {table} ORDER BY id DESC LIMIT 1").fetchone()
    head = {
        "id": int(last[0]) if last is not None else None,
        "hash": str(last[1]) if last is not None else "",
        "rows": count,
    }
    db.execute(
        "INSERT OR REPLACE INTO meta VALUES (?, ?)", (TABLE_HEAD_KEYS[table], json.dumps(head))
    )


def link_all(db: sqlite3.Connection, table: str, genesis: str) -> int:
    """Chain every row of the append-only ``table`` as it stands, write its head; the rows.

    Only for a migration: the rows it chains were written before they could be.
    """
    previous = genesis
    rows = db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
    for row in rows:
        previous = link_hash(table, previous, dict(row))
        db.execute(f"UPDATE {table} SET chain_hash = ? WHERE id = ?", (previous, row["id"]))
    write_table_head(db, table)
    return len(rows)


def rehash_nodes(
    db: sqlite3.Connection, genesis: str, where: str, parameters: tuple[object, ...] = ()
) -> None:
    """Recompute the hash of the node rows ``where`` selects, then the nodes head.

    Call it inside the transaction that changed those rows.
    """
    for row in db.execute(f"SELECT * FROM nodes WHERE {where}", parameters).fetchall():
        db.execute(
            "UPDATE nodes SET row_hash = ? WHERE node_id = ?",
            (node_hash(genesis, dict(row)), row["node_id"]),
        )
    write_nodes_head(db, genesis)


def write_nodes_head(db: sqlite3.Connection, genesis: str) -> None:
    """Record the number of node rows and the digest of their hashes."""
    hashes = [str(row[0]) for row in db.execute("SELECT row_hash FROM nodes")]
    head = {"rows": len(hashes), "hash": nodes_digest(genesis, hashes)}
    db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (NODES_HEAD_KEY, json.dumps(head)))


def parse_head(text: object) -> dict[str, object] | None:
    """The chain head ``{"round", "hash", "rows"}`` stored as ``text``; None if not one."""
    if not isinstance(text, str | bytes | bytearray):
        return None
    try:
        head = json.loads(text)
    except (ValueError, RecursionError):
        return None
    valid = (
        isinstance(head, dict)
        and set(head) == {"round", "hash", "rows"}
        and (head["round"] is None or type(head["round"]) is int)
        and isinstance(head["hash"], str)
        and type(head["rows"]) is int
    )
    return head if valid else None


def parse_heads(meta: Mapping[object, object]) -> dict[str, dict[str, object] | None]:
    """Every head ``meta`` (key to stored text) records, by table; None if absent or malformed."""
    heads = {"rounds": parse_head(meta.get(CHAIN_HEAD_KEY))}
    heads.update(
        {table: parse_table_head(meta.get(TABLE_HEAD_KEYS[table])) for table in LINKED_TABLES}
    )
    heads["nodes"] = parse_nodes_head(meta.get(NODES_HEAD_KEY))
    heads["migrated"] = parse_marker(meta.get(MIGRATED_KEY))
    return heads


def parse_table_head(text: object) -> dict[str, object] | None:
    """The head ``{"id", "hash", "rows"}`` of an append-only table stored as ``text``, or None."""
    head = _json_object(text)
    valid = (
        head is not None
        and set(head) == {"id", "hash", "rows"}
        and (head["id"] is None or type(head["id"]) is int)
        and isinstance(head["hash"], str)
        and type(head["rows"]) is int
    )
    return head if valid else None


def parse_nodes_head(text: object) -> dict[str, object] | None:
    """The nodes head ``{"rows", "hash"}`` stored as ``text``; None if not one."""
    head = _json_object(text)
    valid = (
        head is not None
        and set(head) == {"rows", "hash"}
        and type(head["rows"]) is int
        and isinstance(head["hash"], str)
    )
    return head if valid else None


def parse_marker(text: object) -> dict[str, object] | None:
    """The migration marker stored as ``text``; None if absent or not one."""
    marker = _json_object(text)
    keys = {"from_schema", "at", "nodes", *LINKED_TABLES}
    valid = (
        marker is not None
        and set(marker) == keys
        and all(type(marker[key]) is int for key in keys - {"at"})
        and type(marker["at"]) in (int, float)
    )
    return marker if valid else None


def _json_object(text: object) -> dict[str, object] | None:
    if not isinstance(text, str | bytes | bytearray):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
