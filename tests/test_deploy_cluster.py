"""A real deployment on this machine: SuperLink + 3 SuperNodes, TLS and node authentication.

Each SuperNode runs in a network namespace of its own (ip netns + veth on a
bridge, addresses in 10.213.K.0/24 that exist only there), set up and removed by
the ``cluster`` fixture; where namespaces cannot be made the fixture says so and
uses 127.0.0.1. Runs are driven with ``flwr run`` and observed and controlled
through the ``fedcoord`` CLI on the runs directory passed in run-config, as in
tests/test_lifecycle_sim.py.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from deploy.certs import create_node_keys
from deploy.local_cluster import PROJECT_DIR, LocalDeployment
from server.simulation import stop_tree
from tests.conftest import fedcoord, run_config_text, wait_until

pytestmark = pytest.mark.slow

LOCAL_EXAMPLES = 300
FAST = {"local-epochs": 1, "batch-size": 32}


def write_site_data(folder: Path) -> Path:
    """A node's own data: 300 digits as uint8 (N, H, W), with labels."""
    digits = load_digits()
    rows = np.random.default_rng(1).choice(len(digits.target), LOCAL_EXAMPLES, replace=False)
    folder.mkdir(parents=True, exist_ok=True)
    x = np.round(digits.images[rows] * 255 / 16).astype(np.uint8)
    np.savez(folder / "data.npz", x=x, y=digits.target[rows])
    return folder


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    root = tmp_path_factory.mktemp("deployment")
    site = write_site_data(root / "site-c")
    deployment = LocalDeployment(
        root,
        [
            ["--partition-id", "0", "--num-partitions", "2"],
            ["--partition-id", "1", "--num-partitions", "2"],
            ["--data-path", str(site)],
        ],
        namespaces=True,
        node_args=["--cpu-threads", "1", "--heartbeat-interval", "10"],
    )
    with deployment:
        if deployment.namespace_error:
            warnings.warn(
                f"{deployment.namespace_error}; the SuperNodes use loopback addresses instead",
                stacklevel=1,
            )
        yield deployment


def submit(cluster: LocalDeployment, run_name: str, stream: bool, **settings: object):
    runs_dir = cluster.root / "runs"
    config = {"run-name": run_name, "runs-dir": str(runs_dir), **FAST, **settings}
    result = cluster.flwr_run(run_config_text(config), stream=stream)
    return result, runs_dir / run_name


def status(run_dir: Path) -> dict:
    return json.loads(fedcoord(run_dir.parent, "status", run_dir.name, "--json").stdout)


def node_rows(run_dir: Path) -> dict[str, dict[str, str]]:
    """``fedcoord nodes RUN`` parsed: node id -> columns."""
    output = fedcoord(run_dir.parent, "nodes", run_dir.name).stdout.splitlines()
    header = output[0].split()
    return {row.split()[1]: dict(zip(header, row.split(), strict=False)) for row in output[1:]}


def rounds(run_dir: Path) -> list[tuple[int, int, int]]:
    """(round, accepted, failed) of every completed training round."""
    with sqlite3.connect(run_dir / "run.db") as db:
        return list(db.execute("SELECT round, accepted, failed FROM rounds WHERE round > 0"))


def wait_for_log_line(log: Path | None, text: str, timeout_s: float) -> None:
    """Return as soon as ``text`` appears once more in ``log`` (polled every 10 ms)."""
    assert log is not None
    seen = log.read_text().count(text)
    deadline = time.monotonic() + timeout_s
    while log.read_text().count(text) == seen:
        assert time.monotonic() < deadline, f"no new {text!r} in {log} within {timeout_s}s"
        time.sleep(0.01)


def test_unregistered_key_and_plain_http_nodes_are_refused(cluster):
    # Prepare: a key the SuperLink never registered
    rogue = create_node_keys(cluster.keys, "rogue", force=True).private_key
    deploy = [sys.executable, "-m", "deploy", "supernode", "--superlink"]
    prefix = cluster.network.prefix(0) if cluster.network else []

    # Execute: our node command with that key; Flower's own node without TLS
    refused = subprocess.run(
        [*prefix, *deploy, cluster.superlink_address, "--ca", str(cluster.certs / "ca.crt")]
        + ["--key", str(rogue), "--partition-id", "0", "--num-partitions", "2"]
        + ["--port", "19990", "--flwr-home", str(cluster.root / "flwr-rogue")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=PROJECT_DIR,
        env=cluster.env(),
    )
    plain = subprocess.run(
        # --isolation process: no SuperExec child to outlive it and hold the output pipes
        [*prefix, str(Path(sys.executable).with_name("flower-supernode")), "--insecure"]
        + ["--superlink", cluster.superlink_address, "--max-retries", "1"]
        + ["--isolation", "process"]
        + ["--node-config", "partition-id=0 num-partitions=2", "--port", "19991"],
        capture_output=True,
        text=True,
        timeout=180,
        env=cluster.env(),
    )
    checked = subprocess.run(
        [*deploy, cluster.superlink_address, "--insecure", "--no-auth"]
        + ["--partition-id", "0", "--num-partitions", "2", "--check-only"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_DIR,
        env=cluster.env(),
    )

    # Assert: each refused with a message that says why; still only 3 nodes online
    assert refused.returncode == 3, refused.stdout[-3000:]
    assert "its key is not registered" in refused.stdout
    assert f"python -m deploy register {rogue}.pub" in refused.stdout
    assert plain.returncode != 0
    assert "Failed to initialize the connection to the SuperLink" in plain.stdout + plain.stderr
    assert checked.returncode == 2 and "uses TLS but this node was started with --insecure" in (
        checked.stderr
    )
    assert len(cluster.online_nodes()) == 3


def test_three_rounds_with_three_nodes_one_on_its_own_data(cluster):
    # Execute
    result, run_dir = submit(
        cluster, "three-nodes", stream=True, **{"num-server-rounds": 3, "min-train-nodes": 3}
    )

    # Assert: completed, every node in every round; the data-path node trained on its 240
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert status(run_dir)["state"] == "completed"
    assert [(r, a, f) for r, a, f in rounds(run_dir)] == [(1, 3, 0), (2, 3, 0), (3, 3, 0)]
    nodes = node_rows(run_dir)
    assert len(nodes) == 3
    by_partition = {row["PARTITION"]: row for row in nodes.values()}
    assert set(by_partition) == {"0", "1", "-1"}
    assert by_partition["-1"]["EXAMPLES"] == str(LOCAL_EXAMPLES - LOCAL_EXAMPLES // 5)
    assert all(row["ROUNDS"] == "3" and row["DEVICE"] == "cpu" for row in nodes.values())
    assert status(run_dir)["metrics"]["central_accuracy"] > 0.6


def test_lifecycle_and_a_killed_node_on_a_deployed_run(cluster):
    # Prepare: a long run whose rounds close at an 8 s deadline with 2 of 3 replies
    result, run_dir = submit(
        cluster,
        "lifecycle",
        stream=False,
        **{"num-server-rounds": 300, "min-train-nodes": 2, "round-timeout": 8.0},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: status(run_dir)["current_round"] >= 2, 240, "round 2")

    # Execute: pause, hold, resume
    assert "pause queued" in fedcoord(run_dir.parent, "pause", "lifecycle").stdout
    wait_until(lambda: status(run_dir)["state"] == "paused", 60, "paused")
    held_at = status(run_dir)["current_round"]
    time.sleep(6)
    assert status(run_dir)["current_round"] == held_at
    assert status(run_dir)["heartbeat_age_s"] < 5
    fedcoord(run_dir.parent, "resume", "lifecycle")
    wait_until(lambda: status(run_dir)["current_round"] > held_at, 60, "a round after resume")

    # Execute: kill -9 node 2 (its supervisor, Flower's SuperNode, the worker) mid-round:
    # as it starts receiving a train message, before it has trained
    victim_id = next(node for node, row in node_rows(run_dir).items() if row["PARTITION"] == "1")
    wait_for_log_line(cluster.nodes[1].log_file, "Receiving: train message", 60)
    cluster.kill_node(1)
    killed_in = status(run_dir)["current_round"] + 1
    joined_before = int(node_rows(run_dir)[victim_id]["ROUNDS"])

    # Assert: that round closes at the deadline with the other two, and the run goes on
    wait_until(
        lambda: any(r >= killed_in and a == 2 and f >= 1 for r, a, f in rounds(run_dir)),
        120,
        "a round closed with 2 accepted and the killed node failed",
    )
    closed = next(r for r, a, f in rounds(run_dir) if r >= killed_in and a == 2 and f >= 1)
    wait_until(lambda: status(run_dir)["current_round"] > closed, 60, "the next round")

    # Execute: restart the node; it waits until the SuperLink lets go of its old session
    cluster.start_node(1)

    # Assert: it rejoins a later round under the same node id
    wait_until(
        lambda: int(node_rows(run_dir)[victim_id]["ROUNDS"]) > joined_before,
        180,
        "the restarted node to join a round",
    )
    assert cluster.nodes[1].log_file.read_text().count(f"SuperNode ID: {victim_id}") == 2

    # Execute: stop
    fedcoord(run_dir.parent, "stop", "lifecycle")
    wait_until(lambda: status(run_dir)["state"] == "stopped", 60, "stopped")

    # Assert: consistent run directory; commands on a stopped run are refused
    assert "intact" in fedcoord(run_dir.parent, "verify", "lifecycle").stdout
    refused = fedcoord(run_dir.parent, "resume", "lifecycle", check=False)
    assert refused.returncode == 2 and "cannot resume a run that is stopped" in refused.stderr
    stopped_at = status(run_dir)["current_round"]
    assert 0 < stopped_at < 300


def test_stopping_a_node_leaves_the_federation_at_once(cluster):
    # Execute: SIGTERM (by PID) node 3; Flower deregisters it on the way out
    node = cluster.nodes[2]
    assert node.process is not None
    stop_tree(node.process, grace_s=20)

    # Assert
    wait_until(lambda: len(cluster.online_nodes()) == 2, 30, "2 nodes online")
    assert "SIGTERM: stopping the SuperNode" in node.log_file.read_text()
