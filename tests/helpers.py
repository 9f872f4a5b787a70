"""Plain helpers shared by test modules: the CLI and simulations, a fake Grid, made-up runs.

Fixtures live in conftest.py; test modules import helpers from here and never
from one another.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from starlette.exceptions import StarletteDeprecationWarning

from server.coordinator import Coordinator
from server.launch.simulation import LocalSuperLink, flwr_run_command
from server.record.checkpoints import model_hash, save_checkpoint
from server.record.store import DB_NAME, RoundRecord, RunStore
from server.ui.dashboard import DashboardSettings, create_app
from server.ui.dashboard.security import LOOPBACK_NAMES
from strategies.records import arrays_to_numpy, pack_arrays
from strategies.registry import build_strategy
from task import keys
from task.config import parse_run_config

with warnings.catch_warnings():
    # Starlette 1.3 prefers httpx2 for its TestClient; httpx (a Flower dependency) still works.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    from starlette.testclient import TestClient

NamedArrays = dict[str, np.ndarray]
ReplyFn = Callable[[int, str, NamedArrays], RecordDict]


# ---------------------------------------------------------------------------
# The app as a user runs it: the CLI and simulations
# ---------------------------------------------------------------------------

APP_DIR = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 900


def fedcoord(runs_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the ``fedcoord`` CLI as a user would, on ``runs_dir``."""
    return subprocess.run(
        [sys.executable, "-m", "server.ui.cli", "--runs-dir", str(runs_dir), *args],
        capture_output=True,
        text=True,
        check=check,
        cwd=APP_DIR,
    )


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> object:
    """Poll ``predicate()`` until it returns a truthy value; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (FileNotFoundError, subprocess.CalledProcessError, json.JSONDecodeError) as error:
            last = error
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {last!r}")


@dataclass
class SimulationRun:
    """The outcome of one ``flwr run`` in simulation."""

    returncode: int
    output: str
    run_dir: Path

    def status(self) -> dict:
        """``fedcoord status --json`` for this run."""
        return json.loads(self.cli("status", self.run_dir.name, "--json").stdout)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``fedcoord ARGS`` on this run's runs directory."""
        return fedcoord(self.run_dir.parent, *args, check=check)


def run_config_text(settings: dict[str, object]) -> str:
    """``{"k": v}`` -> ``k=v`` pairs in TOML syntax for ``--run-config``."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())


def run_flwr_simulation(  # noqa: PLR0913
    superlink: LocalSuperLink,
    runs_dir: Path,
    supernodes: int,
    run_name: str,
    run_config: dict[str, object],
    wait: bool = True,
) -> SimulationRun:
    """``flwr run`` the app on ``superlink``; its run directory goes under ``runs_dir``.

    ``wait=False`` submits the run and returns at once (``flwr run`` without
    ``--stream``); follow it through ``SimulationRun.status()``.
    """
    settings = {"run-name": run_name, "runs-dir": str(runs_dir), **run_config}
    command = flwr_run_command(
        APP_DIR, supernodes, run_config_text(settings), num_cpus=1, stream=wait
    )
    result = subprocess.run(
        command,
        env=superlink.env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        cwd=APP_DIR,
    )
    return SimulationRun(result.returncode, result.stdout + result.stderr, runs_dir / run_name)


# ---------------------------------------------------------------------------
# The coordinator and strategies without Flower: a Grid whose nodes reply at once
# ---------------------------------------------------------------------------


class ReplyingGrid(Grid):
    """A Grid whose nodes reply at once with ``reply_fn``; the first pulls may raise.

    Answers the coordinator (``push_messages`` / ``pull_messages``, with the roll
    call) and Flower's own ``Strategy.start()`` (``send_and_receive``) alike.
    """

    def __init__(
        self,
        node_ids: list[int],
        reply_fn: ReplyFn,
        failing_pulls: int = 0,
        partitions: dict[int, int] | None = None,
    ) -> None:
        self.node_ids = node_ids
        self.reply_fn = reply_fn
        self.failing_pulls = failing_pulls
        self.partitions = partitions or {}  # node id -> partition id (default: the node id)
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:  # noqa: ANN001
        raise NotImplementedError

    @property
    def run(self):  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        ids = []
        for message in messages:
            message_id = f"m{len(self.sent)}"
            message.metadata.__dict__["_message_id"] = message_id
            self.sent.append(message)
            node_id = message.metadata.dst_node_id
            if message.metadata.message_type == "query":  # the roll call
                partition = self.partitions.get(node_id, node_id)
                content = RecordDict({keys.METRICS: MetricRecord({keys.PARTITION_ID: partition})})
            else:
                received = arrays_to_numpy(message.content.array_records[keys.ARRAYS])
                content = self.reply_fn(node_id, message.metadata.message_type, received)
            self._replies[message_id] = Message(content=content, reply_to=message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        if self.failing_pulls > 0:
            self.failing_pulls -= 1
            raise TypeError("'int' object is not iterable")  # as Flower inflating a bad Array
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        return self.pull_messages(self.push_messages(messages))


def honest(node_id: int, message_type: str, received: NamedArrays) -> RecordDict:
    """A ReplyFn: node ``n`` adds 0.01 n to every array; evaluation gives 0.8 accuracy."""
    if message_type == "evaluate":
        metrics = {keys.NUM_EXAMPLES: 10, keys.EVAL_LOSS: 0.5, keys.EVAL_ACCURACY: 0.8}
        return RecordDict({keys.METRICS: MetricRecord(metrics)})
    trained = {name: value + np.float32(0.01 * node_id) for name, value in received.items()}
    metrics = {keys.NUM_EXAMPLES: 20, keys.PARTITION_ID: node_id, keys.TRAIN_LOSS: 0.3}
    return RecordDict({keys.ARRAYS: pack_arrays(trained), keys.METRICS: MetricRecord(metrics)})


def make_coordinator(tmp_path, grid: Grid, **run_config: object) -> Coordinator:  # noqa: ANN001
    """A Coordinator of run ``tmp_path / "run"`` on ``grid``; central evaluation is fixed."""
    config = parse_run_config({"runs-dir": str(tmp_path), "round-timeout": 5.0, **run_config})
    store = RunStore.create(tmp_path / "run", "run", {}, config.num_server_rounds)
    return Coordinator(grid, build_strategy(config), store, config, lambda arrays: (0.1, 0.9))


def model() -> NamedArrays:
    """A small global model: ``w`` zeros (2, 3), ``b`` ones (3,)."""
    return {"w": np.zeros((2, 3), dtype=np.float32), "b": np.ones(3, dtype=np.float32)}


def rejections(tmp_path) -> list[tuple[int, str, str]]:  # noqa: ANN001
    """(round, node id, reason) of each rejection of run ``tmp_path / "run"``, in order."""
    with sqlite3.connect(tmp_path / "run" / "run.db") as db:
        return db.execute("SELECT round, node_id, reason FROM rejections ORDER BY id").fetchall()


# ---------------------------------------------------------------------------
# Run directories written through the real run store
# ---------------------------------------------------------------------------

SERVER_PID = 4242  # the server pid a made-up live run names


def round_record(server_round: int, **fields: object) -> RoundRecord:
    """Round ``server_round`` of a made-up run: 3 nodes sampled, 2 accepted, 1 rejected.

    Round 0 (the model before training) is not an update; ``fields`` replace any
    of these values.
    """
    values: dict[str, object] = {
        "round": server_round,
        "started_at": 0.0,
        "ended_at": 2.0,
        "sampled": 3,
        "accepted": 2,
        "rejected": 1,
        "failed": 0,
        "updated": server_round > 0,
        "metrics": {"central-accuracy": 0.3 * server_round, "central-loss": 1.0},
        "model_hash": "h",
    }
    return RoundRecord(**(values | fields))  # type: ignore[arg-type]


def add_round(  # noqa: PLR0913
    store: RunStore,
    server_round: int,
    record_fn: Callable[[int], RoundRecord] = round_record,
    model_fn: Callable[[int], NamedArrays] | None = None,
    strategy_state: Mapping[str, np.ndarray] | None = None,
    metadata: Mapping[str, object] | None = None,
) -> None:
    """Record ``record_fn(server_round)`` in ``store``.

    With ``model_fn`` the round also gets a checkpoint of ``model_fn(server_round)``
    (with ``strategy_state`` and ``metadata``) and that model's hash, as the
    coordinator writes them.
    """
    record = record_fn(server_round)
    if model_fn is None:
        store.record_round(record)
        return
    model = model_fn(server_round)
    checkpoint = save_checkpoint(
        store.run_dir, server_round, model, strategy_state or {}, metadata or {}
    )
    store.record_round(replace(record, model_hash=model_hash(model)), checkpoint=checkpoint)


def make_run(  # noqa: PLR0913
    runs_dir: Path,
    name: str = "run",
    *,
    config: Mapping[str, object] | None = None,
    num_rounds: int = 5,
    state: str | None = "running",
    rounds: Iterable[int] = range(3),
    nodes: bool = True,
    **round_options: object,
) -> RunStore:
    """The run ``runs_dir / name`` written through the real store; the store is left open.

    config: the run config it stores (default: fedavg, seed 1)
    state: set with a fresh heartbeat and SERVER_PID; None leaves the run as created
    rounds: the rounds on record, each written by ``add_round(store, round, **round_options)``
    nodes: node 11 joined, node 12's update was rejected in round 1, and a start event
    """
    stored = {"strategy": "fedavg", "seed": 1} if config is None else dict(config)
    store = RunStore.create(runs_dir / name, name, stored, num_rounds=num_rounds)
    if state is not None:
        store.update_run(state=state, heartbeat_at=time.time(), server_pid=SERVER_PID)
    for server_round in rounds:
        add_round(store, server_round, **round_options)  # type: ignore[arg-type]
    if nodes:
        store.record_node_reply(11, partition_id=0, num_examples=100, device="cpu", joined=True)
        store.record_node_fault(12, 1, "rejected", "array 'w' contains NaN")
        store.add_event("start", "run started")
    return store


COMPARED_CONFIG = {"strategy": "fedavg", "seed": 1, "lr": 0.05, "run-name": "x", "runs-dir": "/r"}


def make_run_reaching(  # noqa: PLR0913
    runs_dir: Path,
    name: str,
    accuracies: list[float],
    state: str = "completed",
    duration_s: float = 10.0,
    rejected: int = 0,
    epsilons: list[float] | None = None,
    **config: object,
) -> Path:
    """A run whose round k (0 = before training) took ``duration_s`` and reached accuracies[k].

    Its stored config is COMPARED_CONFIG with ``config`` and its name; the store is closed.
    """

    def record(server_round: int) -> RoundRecord:
        accuracy = accuracies[server_round]
        metrics = {"central-accuracy": accuracy, "central-loss": 1.0 - accuracy}
        if epsilons is not None:
            metrics["epsilon"] = epsilons[server_round]
        return round_record(
            server_round,
            started_at=100.0 * server_round,
            ended_at=100.0 * server_round + duration_s,
            accepted=3 - rejected,
            rejected=rejected if server_round else 0,
            metrics=metrics,
        )

    settings = {**COMPARED_CONFIG, **config, "run-name": name}
    rounds = range(len(accuracies))
    kept = {"num_rounds": len(accuracies) - 1, "state": state, "nodes": False}
    make_run(runs_dir, name, config=settings, rounds=rounds, record_fn=record, **kept).close()
    return runs_dir / name


def checkpointed_copy(runs_dir: Path) -> bytes:
    """The bytes of a good run.db with its WAL folded in, to cut short or edit."""
    make_run(runs_dir, "good-source")
    db = sqlite3.connect(runs_dir / "good-source" / DB_NAME)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return (runs_dir / "good-source" / DB_NAME).read_bytes()


def write_db(run_dir: Path, data: bytes) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / DB_NAME).write_bytes(data)


def execute(run_dir: Path, script: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(run_dir / DB_NAME)
    db.executescript(script)
    db.close()


# ---------------------------------------------------------------------------
# The dashboard and MLflow, read back
# ---------------------------------------------------------------------------

LOCAL = "http://127.0.0.1:8765"
ACTION = {"X-Fedcoord-Request": "1"}


def local_client(runs_dir: Path, **settings: object) -> TestClient:
    """A client of the dashboard as ``fedcoord dashboard`` binds it by default."""
    app = create_app(DashboardSettings(runs_dir, allowed_hosts=LOOPBACK_NAMES, **settings))
    return TestClient(app, base_url=LOCAL)


def mlflow_client(uri: str):  # noqa: ANN201 - MLflow is imported when used: it is slow to import
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:  # noqa: ANN001
    return [(m.step, round(m.value, 6)) for m in client.get_metric_history(run_id, key)]
