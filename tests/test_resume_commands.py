"""A command queued for a server that is gone does not act on the resumed run."""

from __future__ import annotations

import time

from server.app import open_resumed_run
from server.record import lifecycle
from server.record.store import RunStore
from task.config import parse_run_config


def test_commands_queued_before_a_resume_are_dropped_with_an_event(tmp_path):
    # Prepare: a run whose server died (stale heartbeat) with a stop and a pause queued
    store = RunStore.create(tmp_path / "old", "old", {}, 3)
    store.update_run(state=lifecycle.RUNNING, heartbeat_at=time.time() - 3600)
    store.add_command("stop")
    store.add_command("pause")
    store.close()
    config = parse_run_config({"runs-dir": str(tmp_path), "run-name": "old", "resume": True})

    # Execute
    resumed = open_resumed_run(config)

    # Assert: nothing pending, and the event log says what was dropped
    assert resumed.pending_commands() == []
    events = [(e["kind"], e["message"]) for e in resumed.events()]
    assert (
        "dropped",
        "2 command(s) queued for the previous server dropped on resume: stop, pause",
    ) in events
    resumed.close()
