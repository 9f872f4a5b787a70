"""Tamper evidence of ``run.db``: the hash chain over the round rows and its head.

Schema 2: each round row carries a hash chained over every other column of the
row and the previous row's hash, starting from a genesis hash bound to the run
(name, creation time, config). The newest row's round and hash are kept apart
as the chain head (``meta``), written in the same transaction as the row, so
deleting the newest rows is noticed too. Schema 1 (older fedcoord) chained only
a row's model hash, round and metrics, from a genesis of zeros.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Mapping

GENESIS_HASH = "0" * 64  # the first link of a schema 1 chain
CHAIN_FORMAT = "fedcoord-chain-2"
CHAIN_HEAD_KEY = "chain_head"


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


def _canonical(value: object) -> object:
    if isinstance(value, bytes):
        return {"blob": value.hex()}
    return [type(value).__name__, value]


def write_head(db: sqlite3.Connection, server_round: int | None, link: str, rows: int) -> None:
    """Record the chain head: the newest row's round and hash, and the number of rows."""
    head = json.dumps({"round": server_round, "hash": link, "rows": rows})
    db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (CHAIN_HEAD_KEY, head))


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
