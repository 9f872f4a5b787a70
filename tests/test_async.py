"""Asynchronous buffered aggregation (FedBuff, mode='async'): math, versions, lifecycle, delay."""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp import Grid

from client.delay import delay_seconds
from server import async_rounds
from server.async_rounds import AsyncCoordinator
from server.control import StopRequestedError
from server.record import lifecycle, results
from server.record.checkpoints import checkpoint_path, load_checkpoint
from server.record.runs import run_status
from server.record.store import RunStore
from server.record.verify import verify_run
from server.ui import cli
from server.ui.read_verbs import progress_line
from strategies.aggregation import ClippedMeanAggregator, compute_update_norm
from strategies.fedbuff import (
    StalenessBuffer,
    VersionHistory,
    compute_staleness_weight,
    find_staleness_problem,
)
from strategies.records import pack_arrays
from strategies.registry import build_strategy
from task import keys
from task.config import ConfigError, config_to_dict, parse_run_config
from task.config_values import parse_client_delay
from tests.helpers import ReplyingGrid, honest, model

pytestmark = pytest.mark.usefixtures("server_identity")


# ---------------------------------------------------------------- pure math


def test_staleness_weights_follow_the_paper():
    assert compute_staleness_weight(7, "constant") == 1.0
    assert compute_staleness_weight(0, "polynomial") == 1.0
    assert compute_staleness_weight(3, "polynomial", 0.5) == pytest.approx(0.5)
    assert compute_staleness_weight(8, "polynomial", 1.0) == pytest.approx(1 / 9)
    for bad in [(-1, "constant", 0.5), (1, "linear", 0.5), (1, "polynomial", -1.0)]:
        with pytest.raises(ValueError):
            compute_staleness_weight(*bad)


def test_an_update_older_than_max_staleness_is_refused_with_the_reason():
    assert find_staleness_problem(3, 5, max_staleness=2) is None
    reason = find_staleness_problem(2, 5, max_staleness=2)
    assert reason is not None and "staleness 3 > max-staleness=2" in reason
    assert find_staleness_problem(6, 5, max_staleness=2) is not None


def updates(rng: np.random.Generator, count: int) -> list[list[np.ndarray]]:
    return [[rng.normal(size=(3, 2)).astype(np.float32)] for _ in range(count)]


def test_fedavg_buffer_is_the_staleness_weighted_sum_over_the_examples():
    # Prepare
    rng = np.random.default_rng(0)
    reference = [rng.normal(size=(3, 2)).astype(np.float32)]
    clients = updates(rng, 3)
    examples, stalenesses = [10.0, 30.0, 60.0], [0, 3, 8]
    buffer = StalenessBuffer("fedavg", buffer_size=3, staleness_weight="polynomial")

    # Execute
    for client, n, tau in zip(clients, examples, stalenesses, strict=True):
        assert not buffer.full
        buffer.add_difference(client, reference, n, tau)

    # Assert: sum(n_i s_i u_i) / sum(n_i), so a stale buffer is a smaller step
    scales = [(1 + tau) ** -0.5 for tau in stalenesses]
    oracle = sum(
        n * s * (c[0] - reference[0]) for c, n, s in zip(clients, examples, scales, strict=True)
    ) / sum(examples)
    assert buffer.full
    np.testing.assert_allclose(buffer.result()[0], oracle, rtol=1e-5, atol=1e-6)
    assert buffer.staleness_metrics() == {
        "staleness-mean": pytest.approx(11 / 3),
        "staleness-max": 8.0,
        "staleness-0": 1.0,
        "staleness-3": 1.0,
        "staleness-8": 1.0,
    }


def test_mean_buffer_ignores_examples_and_constant_weighting_is_plain_mean():
    rng = np.random.default_rng(1)
    reference = [np.zeros((3, 2), dtype=np.float32)]
    clients = updates(rng, 2)
    buffer = StalenessBuffer("mean", buffer_size=2, staleness_weight="constant")
    buffer.add_difference(clients[0], reference, 5.0, 4)
    buffer.add_difference(clients[1], reference, 500.0, 0)
    np.testing.assert_allclose(buffer.result()[0], (clients[0][0] + clients[1][0]) / 2, rtol=1e-6)


def test_clipped_buffer_scales_each_clipped_update_by_its_staleness_weight():
    rng = np.random.default_rng(2)
    reference = [np.zeros((3, 2), dtype=np.float32)]
    clients = [[10 * u[0]] for u in updates(rng, 2)]
    buffer = StalenessBuffer("clipped", buffer_size=2, clip_norm=1.0)
    buffer.add_difference(clients[0], reference, 1.0, 0)
    buffer.add_difference(clients[1], reference, 1.0, 3)

    clipped = [c[0] / compute_update_norm(c) for c in clients]
    np.testing.assert_allclose(
        buffer.result()[0], (clipped[0] + 0.5 * clipped[1]) / 2, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="scale"):
        ClippedMeanAggregator().add_difference(clients[0], reference, scale=1.5)


def test_only_streaming_aggregators_buffer():
    with pytest.raises(ValueError, match="fedavg, mean, weighted, clipped"):
        StalenessBuffer("krum", buffer_size=2)


def test_version_history_holds_only_the_versions_trainings_started_from():
    history = VersionHistory(max_staleness=2)
    history.publish(0, {"w": np.zeros(1)})
    history.checkout(0)
    history.publish(1, {"w": np.ones(1)})
    history.publish(2, {"w": np.ones(1)})
    assert history.held == [0, 2]  # 1: no training started from it
    history.publish(3, {"w": np.ones(1)})
    assert history.held == [3]  # 0 is 3 versions old: its reply would be rejected
    assert history.get(0) is None
    history.release(0)
    assert history.held == [3]


# ------------------------------------------------------------------- config


def test_async_keys_are_parsed_and_bad_values_refused_with_the_valid_ones():
    config = parse_run_config({"mode": "async", "concurrency": 3, "buffer-size": 2})
    assert (config.mode, config.concurrency, config.buffer_size) == ("async", 3, 2)
    refused = {
        "mode": ("eventually", "valid: sync, async"),
        "staleness-weight": ("linear", "valid: constant, polynomial"),
        "concurrency": (0, "concurrency must be >= 1"),
        "buffer-size": (0, "buffer-size must be >= 1"),
        "max-staleness": (-1, "max-staleness must be >= 0"),
        "staleness-exponent": (-0.5, "staleness-exponent must be in [0, 10]"),
        "client-delay": ("slow", "client-delay 'slow' is malformed"),
    }
    for key, (value, message) in refused.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            parse_run_config({"mode": "async", key: value})


def test_strategies_that_do_not_stream_are_refused_in_async_mode_with_the_reason():
    for strategy in ("krum", "median", "fedadam"):
        with pytest.raises(ConfigError, match="streaming aggregator; valid in async mode"):
            parse_run_config({"mode": "async", "strategy": strategy})
    parse_run_config({"mode": "sync", "strategy": "krum"})
    for key, value in (("target-epsilon", 2.0), ("sampling", "poisson")):
        with pytest.raises(ConfigError, match="not accounted in mode='async'"):
            parse_run_config({"mode": "async", "strategy": "clipped", key: value})


# -------------------------------------------------------------- delay knob


def test_client_delay_is_deterministic_from_seed_partition_and_round():
    delay = parse_client_delay("lognormal:1.0")
    first = [delay_seconds(delay, 42, p, r, 300.0) for p in range(4) for r in range(3)]
    again = [delay_seconds(delay, 42, p, r, 300.0) for p in range(4) for r in range(3)]
    other_seed = [delay_seconds(delay, 43, p, r, 300.0) for p in range(4) for r in range(3)]
    assert first == again
    assert first != other_seed
    assert len(set(first)) == len(first)
    assert delay_seconds(parse_client_delay("lognormal:5"), 42, 0, 0, 2.0) <= 2.0


def test_client_delay_by_partition_with_a_default():
    delay = parse_client_delay("*=0.5, 3=2.5")
    assert [delay_seconds(delay, 0, p, 1, 300.0) for p in (0, 3, 9)] == [0.5, 2.5, 0.5]
    assert not parse_client_delay("").active
    assert parse_client_delay("2=1").seconds == {2: 1.0}
    for bad in ("3=-1", "x=1", "lognormal:9", "3=inf", "lognormal:"):
        with pytest.raises(ConfigError):
            parse_client_delay(bad)


# ------------------------------------------------- the coordinator, scripted


@pytest.fixture(autouse=True)
def commands_read_every_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted runs take milliseconds: read the operator's commands on every pass."""
    monkeypatch.setattr(async_rounds, "COMMAND_POLL_S", 0.0)


class ScriptedGrid(ReplyingGrid):
    """Replies come ``ticks[node]`` pulls after the push (default 0); ``on_pull`` hooks in."""

    def __init__(self, node_ids: list[int], ticks: dict[int, int] | None = None) -> None:
        super().__init__(node_ids, honest)
        self.ticks = ticks or {}
        self.pulls = 0
        self.due: dict[str, int] = {}
        self.on_pull = lambda pulls: None
        self.pushed_while: list[str] = []
        self.coordinator: AsyncCoordinator | None = None

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        ids = super().push_messages(messages)
        for message, message_id in zip(messages, ids, strict=True):
            self.due[message_id] = self.pulls + self.ticks.get(message.metadata.dst_node_id, 0)
            if self.coordinator is not None and message.metadata.message_type == "train":
                self.pushed_while.append(self.coordinator.control.state)
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        self.pulls += 1
        self.on_pull(self.pulls)
        ready = [mid for mid in message_ids if self.due.get(mid, 0) <= self.pulls]
        return super().pull_messages(ready)


def make_async(tmp_path, grid: Grid, **run_config: object) -> AsyncCoordinator:  # noqa: ANN001
    settings = {"runs-dir": str(tmp_path), "round-timeout": 5.0, "mode": "async", **run_config}
    config = parse_run_config(settings)
    store = RunStore(tmp_path / "run") if (tmp_path / "run").exists() else None
    if store is None:
        stored = config_to_dict(config)
        store = RunStore.create(tmp_path / "run", "run", stored, config.num_server_rounds)
    coordinator = AsyncCoordinator(
        grid, build_strategy(config), store, config, lambda arrays: (0.1, 0.9)
    )
    if isinstance(grid, ScriptedGrid):
        grid.coordinator = coordinator
    return coordinator


def rows(tmp_path, name: str = "run") -> list[sqlite3.Row]:  # noqa: ANN001
    with sqlite3.connect(tmp_path / name / "run.db") as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM rounds ORDER BY round").fetchall()


def rejections(tmp_path) -> list[tuple[int, str, str]]:  # noqa: ANN001
    with sqlite3.connect(tmp_path / "run" / "run.db") as db:
        return db.execute("SELECT round, kind, reason FROM rejections ORDER BY id").fetchall()


def test_a_version_is_published_exactly_every_buffer_size_accepted_updates(tmp_path, monkeypatch):
    # Prepare: 4 nodes, 3 in flight, 2 updates per version; node 4 is slow
    grid = ScriptedGrid([1, 2, 3, 4], ticks={4: 3})
    coordinator = make_async(
        tmp_path, grid, **{"num-server-rounds": 5, "concurrency": 3, "buffer-size": 2}
    )

    # Execute
    final = coordinator.run(model())

    # Assert: versions 0..5, each made of exactly 2 accepted updates, chained and checkpointed
    recorded = rows(tmp_path)
    assert [row["round"] for row in recorded] == [0, 1, 2, 3, 4, 5]
    assert [row["accepted"] for row in recorded[1:]] == [2] * 5
    assert all(row["updated"] for row in recorded[1:])
    assert coordinator.version == 5
    assert len(coordinator.in_flight) <= 3
    assert verify_run(tmp_path / "run")[0] == []
    saved = load_checkpoint(checkpoint_path(tmp_path / "run", 5), recorded[5]["checkpoint_sha256"])
    np.testing.assert_array_equal(saved.arrays["w"], final["w"])
    train_messages = [m for m in grid.sent if m.metadata.message_type == "train"]
    versions = [
        int(m.content.config_records[keys.CONFIG][keys.MODEL_VERSION]) for m in train_messages
    ]
    assert versions == sorted(versions) and versions[0] == 0
    status = run_status(tmp_path / "run")
    assert (status["mode"], status["step"]) == ("async", "version")
    assert "version 5/5" in progress_line(status)
    labels: list[str] = []
    monkeypatch.setattr(
        results,
        "save_figure",
        lambda figure, title, output: labels.extend(axis.get_xlabel() for axis in figure.axes),
    )
    assert (
        cli.main(["--runs-dir", str(tmp_path), "plot", "run", "-o", str(tmp_path / "p.png")]) == 0
    )
    assert labels[:3] == ["version"] * 3  # the panels over versions (then privacy, if any)


def test_stale_updates_are_weighted_down_or_rejected_with_the_reason(tmp_path):
    # Prepare: node 3 replies after 6 pulls; the others at once; no update may be 1 version old
    grid = ScriptedGrid([1, 2, 3], ticks={3: 6})
    coordinator = make_async(
        tmp_path,
        grid,
        **{"num-server-rounds": 10, "concurrency": 3, "buffer-size": 2, "max-staleness": 1},
    )

    # Execute
    coordinator.run(model())

    # Assert: node 3's update came versions late and was rejected, recorded with the reason
    stale = [r for r in rejections(tmp_path) if "stale update" in r[2]]
    assert stale and stale[0][1] == "rejected"
    assert "max-staleness=1" in stale[0][2]
    recorded = rows(tmp_path)
    assert sum(row["rejected"] for row in recorded) >= 1
    assert all(row["accepted"] == 2 for row in recorded[1:])
    metrics = [row["metrics_json"] for row in recorded[1:]]
    assert all("staleness-mean" in m and "trainings-in-flight" in m for m in metrics)


def test_pause_sends_no_training_and_resume_continues(tmp_path):
    # Prepare: pause once the first replies are in; resume from another thread 1 s later
    grid = ScriptedGrid([1, 2, 3], ticks={1: 2, 2: 2, 3: 2})
    coordinator = make_async(
        tmp_path, grid, **{"num-server-rounds": 3, "concurrency": 2, "buffer-size": 2}
    )
    pause_at = {"pulls": 1}

    def resume_later() -> None:
        time.sleep(1.0)
        RunStore(tmp_path / "run").add_command("resume")

    def on_pull(pulls: int) -> None:
        if pulls == pause_at["pulls"]:
            coordinator.store.add_command("pause")
            threading.Thread(target=resume_later, daemon=True).start()

    grid.on_pull = on_pull

    # Execute
    coordinator.run(model())

    # Assert: nothing was sent while paused, the in-flight trainings were folded, all versions came
    assert lifecycle.PAUSED not in grid.pushed_while
    assert [row["round"] for row in rows(tmp_path)] == [0, 1, 2, 3]
    kinds = [event["kind"] for event in coordinator.store.events(100)]
    assert "paused" in kinds and "running" in kinds


def test_stop_then_resume_continues_the_versions_and_the_chain(tmp_path):
    # Prepare: a stop queued once version 2 is on record
    grid = ScriptedGrid([1, 2, 3])
    settings = {"num-server-rounds": 5, "concurrency": 2, "buffer-size": 2}
    coordinator = make_async(tmp_path, grid, **settings)

    def stop_after_version_2(pulls: int) -> None:
        del pulls
        if coordinator.version >= 2:
            coordinator.store.add_command("stop")

    grid.on_pull = stop_after_version_2

    # Execute: stop, then resume from the newest checkpoint in a fresh coordinator
    with pytest.raises(StopRequestedError):
        coordinator.run(model())
    stopped_at = rows(tmp_path)[-1]
    last = int(stopped_at["round"])
    checkpoint = load_checkpoint(
        checkpoint_path(tmp_path / "run", last), stopped_at["checkpoint_sha256"]
    )
    resumed = make_async(tmp_path, ScriptedGrid([1, 2, 3]), **settings)
    resumed.strategy.load_state_dict(checkpoint.strategy_state)
    resumed.run(checkpoint.arrays, first_round=last + 1)

    # Assert
    assert last >= 2
    assert [row["round"] for row in rows(tmp_path)] == list(range(6))
    assert verify_run(tmp_path / "run")[0] == []


def test_an_error_reply_or_a_bad_update_never_ends_the_run(tmp_path):
    def reply_fn(node_id: int, message_type: str, received):  # noqa: ANN001, ANN202
        if node_id == 2:
            return RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 5})})
        if node_id == 3:
            poisoned = {k: np.full_like(v, np.nan) for k, v in received.items()}
            metrics = MetricRecord({keys.NUM_EXAMPLES: 5, keys.PARTITION_ID: 3})
            return RecordDict({keys.ARRAYS: pack_arrays(poisoned), keys.METRICS: metrics})
        return honest(node_id, message_type, received)

    grid = ScriptedGrid([1, 2, 3, 4])
    grid.reply_fn = reply_fn
    coordinator = make_async(
        tmp_path, grid, **{"num-server-rounds": 2, "concurrency": 4, "buffer-size": 2}
    )
    final = coordinator.run(model())
    reasons = " ".join(r[2] for r in rejections(tmp_path))
    assert "NaN" in reasons and "arrays" in reasons
    assert final and all(np.isfinite(v).all() for v in final.values())


# ------------------------------------------------------- a real simulation


@pytest.mark.slow
def test_async_simulation_with_a_straggler_then_resume_continues_the_versions(simulate):
    # Prepare: 3 nodes, partition 0 two seconds late every time
    settings = {
        "mode": "async",
        "num-server-rounds": 3,
        "concurrency": 3,
        "buffer-size": 2,
        "client-delay": "0=2.0",
        "local-epochs": 1,
        "fraction-evaluate": 0.0,
    }

    # Execute: a run of 3 versions, then resume=true to 4
    run = simulate(3, "fedbuff", **settings)
    resumed = simulate(3, "fedbuff", resume=True, **{**settings, "num-server-rounds": 4})

    # Assert
    assert run.returncode == 0, run.output[-3000:]
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "version 3/3" in run.output
    status = resumed.status()
    assert (status["state"], status["step"], status["current_round"]) == (
        "completed",
        "version",
        4,
    )
    recorded = rows(run.run_dir.parent, "fedbuff")
    assert [row["round"] for row in recorded] == [0, 1, 2, 3, 4]
    assert all(row["accepted"] == 2 and row["updated"] for row in recorded[1:])
    assert recorded[-1]["central_accuracy"] > recorded[0]["central_accuracy"]
    assert "staleness-mean" in recorded[1]["metrics_json"]
    assert resumed.cli("verify", "fedbuff").returncode == 0
