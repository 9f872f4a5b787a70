"""Schema 2 to 3: chain the nodes, rejections and events of a run recorded before.

A schema 2 store (round rows chained, the other tables not) is read as it is. When
its run is resumed, the store's first write migrates it in one transaction: the
columns schema 3 added, every rejection and event row chained as it stands, every
node row hashed, their heads, and a marker saying how many rows were chained at
once. Those rows were not bound when they were written, so an edit made before the
migration cannot be seen; ``fedcoord verify`` says so from the marker.
"""

from __future__ import annotations

import json
import sqlite3
import time

from server.record.chain import LINKED_TABLES, MIGRATED_KEY, link_all, rehash_nodes
from server.record.schema import ADDED_IN_SCHEMA, PREVIOUS_SCHEMA_VERSION, SCHEMA_VERSION


def migrate_to_current(db: sqlite3.Connection, genesis: str) -> None:
    """Bring a schema 2 store to schema 3; call it inside one transaction.

    Parameters
    ----------
    db : sqlite3.Connection
        A writable connection to a schema 2 ``run.db``, in a transaction.
    genesis : str
        The run's genesis hash (:func:`server.record.chain.genesis_hash`).
    """
    for table, columns in ADDED_IN_SCHEMA[SCHEMA_VERSION].items():
        for column in columns:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
    chained = {table: link_all(db, table, genesis) for table in LINKED_TABLES}
    rehash_nodes(db, genesis, "1")
    nodes = int(db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0])
    marker = {"from_schema": PREVIOUS_SCHEMA_VERSION, "at": time.time(), **chained, "nodes": nodes}
    db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (MIGRATED_KEY, json.dumps(marker)))
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
