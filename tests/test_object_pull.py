"""Reply object pulls: short retries, and no pull past the round's deadline."""

from __future__ import annotations

import time

import pytest
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    ObjectUnavailableError,
    pull_objects,
)
from flwr.superlink.grid import http_grid

from server import object_pull


class LateObject:
    """A SuperLink object store where one object appears ``after_s`` seconds from now."""

    def __init__(self, after_s: float) -> None:
        self.available_at = time.monotonic() + after_s
        self.calls = 0

    def __call__(self, object_id: str) -> bytes:
        self.calls += 1
        if time.monotonic() < self.available_at:
            raise ObjectUnavailableError(object_id)
        return object_id.encode()


def test_options_use_short_backoff_and_remaining_round_time() -> None:
    options = object_pull.pull_options({}, deadline=105.0, now=100.0)
    assert options == {
        "initial_backoff": object_pull.INITIAL_BACKOFF_S,
        "backoff_cap": object_pull.BACKOFF_CAP_S,
        "max_time": 5.0,
    }


def test_options_keep_flower_arguments_and_the_smaller_limit() -> None:
    options = object_pull.pull_options(
        {"max_time": 2.0, "initial_backoff": 0.5}, deadline=105.0, now=100.0
    )
    assert options["max_time"] == 2.0
    assert options["initial_backoff"] == 0.5
    past = object_pull.pull_options({}, deadline=99.0, now=100.0)
    assert past["max_time"] == 0.0
    assert "max_time" not in object_pull.pull_options({}, deadline=None, now=100.0)


def test_object_that_arrives_shortly_is_pulled_without_a_one_second_wait() -> None:
    store = LateObject(after_s=0.1)
    pull = object_pull.bounded(pull_objects)
    started = time.monotonic()
    with object_pull.pull_deadline(time.monotonic() + 10):
        contents = pull(["a"], store)
    elapsed = time.monotonic() - started
    assert contents == {"a": b"a"}
    # Flower's own backoff would retry at 1 s; ours retries within ~0.3 s of arrival.
    assert elapsed < 0.6, elapsed
    assert store.calls >= 3


def test_pull_gives_up_at_the_deadline() -> None:
    store = LateObject(after_s=60)
    pull = object_pull.bounded(pull_objects)
    started = time.monotonic()
    with pytest.raises(ObjectPullError), object_pull.pull_deadline(time.monotonic() + 0.3):
        pull(["a"], store)
    assert time.monotonic() - started < 2.0


def test_deadline_is_scoped_to_the_block() -> None:
    with object_pull.pull_deadline(123.0):
        assert object_pull._deadline.get() == 123.0
    assert object_pull._deadline.get() is None


def test_install_is_idempotent_and_wraps_flower_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_grid, "pull_objects", pull_objects)
    object_pull.install()
    first = http_grid.pull_objects
    object_pull.install()
    assert http_grid.pull_objects is first
    assert first.fedcoord_wrapped is pull_objects  # type: ignore[attr-defined]


def test_install_refuses_another_flower_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(http_grid, "pull_objects")
    with pytest.raises(RuntimeError, match="flwr 1.42"):
        object_pull.install()
