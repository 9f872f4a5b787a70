"""The SuperLink launcher: payloads in memory beside the database, throttled status cleanup."""

from __future__ import annotations

import pytest
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.superlink import config_loader

from deploy import flower_superlink
from deploy.flower_superlink import StatusCleanupThrottle


def test_objects_in_memory_keeps_the_link_state_in_the_database(tmp_path, monkeypatch):
    monkeypatch.setattr(config_loader, "ObjectStoreFactory", ObjectStoreFactory)
    flower_superlink.keep_objects_in_memory()
    manager = config_loader.get_federation_manager(is_simulation=False)

    objects, links = config_loader.get_objectstore_linkstate_factories(
        str(tmp_path / "state.db"), manager
    )
    state = links.state()

    assert isinstance(objects.store(), InMemoryObjectStore)
    assert isinstance(state, SqlLinkState)
    assert state.object_store is objects.store()
    assert (tmp_path / "state.db").exists()


def test_objects_in_memory_refuses_another_flower_layout(monkeypatch):
    monkeypatch.delattr(config_loader, "ObjectStoreFactory")
    with pytest.raises(RuntimeError, match="flwr 1.42"):
        flower_superlink.keep_objects_in_memory()


class FakeState:
    """Counts cleanups the way SqlLinkState calls them: inside get_run_status and elsewhere."""

    def __init__(self) -> None:
        self.cleanups = 0

    def _cleanup_expired_task_tokens(self) -> None:
        self.cleanups += 1

    def get_run_status(self, run_ids: set[int]) -> dict[int, str]:
        self._cleanup_expired_task_tokens()
        return {run_id: "running" for run_id in run_ids}

    def activate_task(self) -> None:
        self._cleanup_expired_task_tokens()


def test_status_checks_clean_up_once_per_interval_other_callers_always():
    class State(FakeState):
        pass

    StatusCleanupThrottle(interval_s=3600).install(State)
    state = State()

    statuses = [state.get_run_status({7}) for _ in range(50)]
    after_status_checks = state.cleanups
    state.activate_task()
    state.activate_task()

    assert statuses[-1] == {7: "running"}
    assert after_status_checks == 1
    assert state.cleanups == 3


def test_status_cleanup_runs_again_after_the_interval():
    throttle = StatusCleanupThrottle(interval_s=1.0)
    assert throttle.due(100.0)
    assert not throttle.due(100.5)
    assert throttle.due(101.0)


def test_throttle_install_is_idempotent_and_refuses_other_layouts():
    class State(FakeState):
        pass

    StatusCleanupThrottle(interval_s=1.0).install(State)
    wrapped = State.get_run_status
    StatusCleanupThrottle(interval_s=1.0).install(State)
    assert State.get_run_status is wrapped

    class Other:
        pass

    with pytest.raises(RuntimeError, match="flwr 1.42"):
        StatusCleanupThrottle().install(Other)
