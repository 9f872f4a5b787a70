"""A real deployment on this machine: SuperLink + 3 SuperNodes, TLS and node authentication.

Each SuperNode runs in a network namespace of its own (ip netns + veth on a
bridge, addresses in 10.213.K.0/24 that exist only there), set up and removed by
the ``cluster`` fixture, and one more namespace plays an operator's machine
(``--operator``); where namespaces cannot be made the fixture says so and uses
127.0.0.1, and the tests that need other machines' addresses skip (fail under
CI=true). The SuperLink is behind its nginx proxy, as ``python -m deploy
superlink`` starts it; the nodes allow the build of a snapshot of this app.
Runs are driven with ``flwr run`` from the SuperLink machine and observed and
controlled through the ``fedcoord`` CLI on the runs directory passed in
run-config, as in tests/test_lifecycle_sim.py.
"""

from __future__ import annotations

import json
import os
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

from deploy.apps import app_hash
from deploy.certs import create_node_keys
from deploy.connection import DEFAULT_CONNECTION, flwr_executable, write_connection
from deploy.local_cluster import PROJECT_DIR, LocalDeployment, snapshot_app
from server.launch.processes import flwr_env, stop_tree
from tests.helpers import fedcoord, run_config_text, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.system_package("nginx"),
    # pathspec, inside Flower's FAB build
    pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning"),
]

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
    # The build the nodes allow; a copy, so edits to this folder during the test do not matter
    app = snapshot_app(PROJECT_DIR, root / "app" / "fedcoord")
    deployment = LocalDeployment(
        root,
        [
            ["--partition-id", "0", "--num-partitions", "2"],
            ["--partition-id", "1", "--num-partitions", "2"],
            ["--data-path", str(site)],
        ],
        namespaces=True,
        node_args=["--cpu-threads", "1", "--heartbeat-interval", "10"],
        app_dir=app,
        operator_namespace=True,
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
        + ["--allow-app", app_hash(cluster.app_dir)]
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
        [*deploy, cluster.superlink_address, "--insecure", "--no-auth", "--allow-any-app"]
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


def require_other_machines(cluster: LocalDeployment) -> None:
    """Skip (fail under CI=true) where the nodes could not get addresses of their own."""
    if cluster.network is not None:
        return
    message = f"needs network namespaces (root, iproute2): {cluster.namespace_error}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


def flwr_from(
    cluster: LocalDeployment, index: int | None, *args: str
) -> subprocess.CompletedProcess[str]:
    """``flwr ARGS`` from namespace ``index``, with a connection to the public port and ca.crt."""
    home = cluster.root / f"flwr-cli-{index}"
    ca = cluster.certs / "ca.crt"
    write_connection(home, DEFAULT_CONNECTION, cluster.superlink_address, ca)
    return subprocess.run(
        [*cluster.in_namespace(index), flwr_executable(), *args],
        env=flwr_env(home),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cluster.root,
        check=False,
    )


def unboxed(text: str) -> str:
    """``flwr``'s error box as one line of words."""
    return " ".join(text.replace("│", " ").split())


def listed(cluster: LocalDeployment, what: str) -> list[dict]:
    """``flwr ls`` (runs) or ``flwr supernode list`` (nodes) from the SuperLink machine."""
    command = ["ls"] if what == "runs" else ["supernode", "list"]
    result = subprocess.run(
        [flwr_executable(), *command, DEFAULT_CONNECTION, "--format", "json"],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return list(json.loads(result.stdout)[what])


def test_a_node_cannot_command_the_federation_but_a_listed_operator_can(cluster):
    require_other_machines(cluster)
    # Prepare: what the SuperLink holds now; a key a node would like registered
    runs, nodes = listed(cluster, "runs"), listed(cluster, "nodes")
    smuggled = create_node_keys(cluster.keys, "smuggled", force=True).public_key
    app = str(cluster.app_dir)

    # Execute: from node 1's machine, holding ca.crt as every node does (README)
    run = flwr_from(
        cluster, 0, "run", app, DEFAULT_CONNECTION, "--run-config", "num-server-rounds=1"
    )
    register = flwr_from(cluster, 0, "supernode", "register", str(smuggled), DEFAULT_CONNECTION)
    node_ls = flwr_from(cluster, 0, "ls", DEFAULT_CONNECTION)
    # ... and from the operator's machine, listed with --operator
    operator_ls = flwr_from(cluster, cluster.operator_index, "ls", DEFAULT_CONNECTION)

    # Assert: every Control API call from the node refused, nothing changed on the SuperLink
    for refused, path in ((run, "start-run"), (register, "register-node"), (node_ls, "list-runs")):
        assert refused.returncode != 0, refused.stdout[-2000:]
        assert "Successfully" not in refused.stdout
        url = f"https://{cluster.superlink_address}/v1/control/{path}"
        assert f"'403 Forbidden' for url '{url}'" in unboxed(refused.stderr)
    assert listed(cluster, "runs") == runs
    assert len(listed(cluster, "nodes")) == len(nodes)
    assert operator_ls.returncode == 0, operator_ls.stdout[-2000:] + operator_ls.stderr[-2000:]
    access = (cluster.root / "superlink-state" / "proxy" / "access.log").read_text().splitlines()
    from_node = [line for line in access if line.startswith(cluster.network.node_address(0) + " ")]
    assert any('"POST /v1/control/start-run HTTP/1.1" 403' in line for line in from_node)
    operator = cluster.network.node_address(cluster.operator_index)
    assert not any(line.startswith(operator + " ") for line in access)


ROGUE_SERVER = """
from logging import INFO

from flwr.app import Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    messages = [
        Message(RecordDict(), dst_node_id=node, message_type="train")
        for node in grid.get_node_ids()
    ]
    for reply in grid.send_and_receive(messages, timeout=120):
        reason = reply.error.reason if reply.has_error() else "ran"
        log(INFO, "reply of node %s: %s", reply.metadata.src_node_id, reason)
"""
ROGUE_CLIENT = """
from pathlib import Path

from flwr.clientapp import ClientApp

MARKER = Path({marker!r})
MARKER.write_text("imported on a node")
app = ClientApp()


@app.train()
def train(message, context):
    MARKER.write_text("ran on a node")
    return message.create_reply(message.content)
"""
ROGUE_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "rogueapp"
version = "1.0.0"
dependencies = ["flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "rogue_server:app"
clientapp = "rogue_client:app"

[tool.flwr.app.config]
"""


def write_rogue_app(folder: Path, marker: Path) -> Path:
    """An app no node allowed: its ClientApp leaves ``marker`` wherever it is imported."""
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(ROGUE_PYPROJECT)
    (folder / "rogue_server.py").write_text(ROGUE_SERVER)
    (folder / "rogue_client.py").write_text(ROGUE_CLIENT.format(marker=str(marker)))
    return folder


def test_an_app_build_the_nodes_did_not_allow_is_not_executed_there(cluster, tmp_path):
    # Prepare: submitted from the SuperLink machine, so the proxy lets it through
    marker = tmp_path / "executed-on-a-node"
    app = write_rogue_app(tmp_path / "rogueapp", marker)
    digest = app_hash(app)

    # Execute
    result = cluster.flwr_run("", stream=True, app_dir=app, timeout_s=300)

    # Assert: the run reached every node, and none installed, imported or ran it
    output = result.stdout + result.stderr
    assert output.count(f"refused app build {digest}") == 3, output[-3000:]
    assert not marker.exists()
    assert len(cluster.nodes) == 3
    for node in cluster.nodes:
        assert node.log_file is not None
        assert node.log_file.read_text().count(f"refused app build {digest}") == 1
        installed = [str(path) for path in (cluster.root / f"flwr-{node.name}").rglob("*")]
        assert not any(digest in path for path in installed)


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
    # the own-data node answered -1 at the roll call: recorded without a partition ("-")
    assert set(by_partition) == {"0", "1", "-"}
    assert by_partition["-"]["EXAMPLES"] == str(LOCAL_EXAMPLES - LOCAL_EXAMPLES // 5)
    assert all(row["ROUNDS"] == "3" and row["DEVICE"] == "cpu" for row in nodes.values())
    assert status(run_dir)["metrics"]["central_accuracy"] > 0.6


def test_an_async_run_with_one_slow_node(cluster):
    # Execute: FedBuff, partition 0 four seconds late every time
    settings = {
        "mode": "async",
        "num-server-rounds": 3,
        "concurrency": 3,
        "buffer-size": 2,
        "min-train-nodes": 3,
        "client-delay": "0=4.0",
        "fraction-evaluate": 0.0,
    }
    result, run_dir = submit(cluster, "fedbuff", stream=True, **settings)

    # Assert: three versions of two updates each, the slow node's late ones weighted or folded
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    state = status(run_dir)
    assert (state["state"], state["step"], state["current_round"]) == ("completed", "version", 3)
    assert [(r, a) for r, a, _ in rounds(run_dir)] == [(1, 2), (2, 2), (3, 2)]
    assert fedcoord(run_dir.parent, "verify", run_dir.name, check=False).returncode == 0


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
