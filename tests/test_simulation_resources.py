"""GPUs for simulated nodes and simulation on a Ray cluster the user runs.

Ray hides every GPU from a simulated node that asks for none, so the launcher asks
for a share of the visible GPUs (``--num-gpus``) and refuses, before anything
starts, a run that could not get the GPUs it names. ``--ray-address`` runs the
simulation on an existing cluster, which the launcher never starts or stops.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from server.launch import resources
from server.launch.processes import free_port, process_alive, stop_tree
from server.launch.resources import SimulationResources, plan_resources
from server.launch.simulation import EXIT_CONFIG, flwr_run_command
from task.config import ConfigError
from tests.helpers import APP_DIR, run_config_text

RAY = Path(sys.executable).with_name("ray")


@pytest.fixture()
def gpus(monkeypatch):
    """Set how many GPUs the launcher sees."""

    def set_count(count: int) -> None:
        monkeypatch.setattr(resources, "visible_gpus", lambda: count)

    return set_count


def test_auto_shares_the_visible_gpus_among_the_nodes_at_once(gpus, monkeypatch):
    # Prepare: 16 CPUs, so 16 nodes train at once at 1 CPU each
    monkeypatch.setattr(resources.os, "cpu_count", lambda: 16)
    gpus(2)

    # Execute
    shared = plan_resources("auto", "", "auto", supernodes=100, num_cpus=1.0)
    few = plan_resources("auto", "", "cuda", supernodes=1, num_cpus=1.0)
    gpus(0)
    none = plan_resources("auto", "", "auto", supernodes=100, num_cpus=1.0)

    # Assert
    assert shared == SimulationResources(0.12, "")
    assert few == SimulationResources(1.0, "")
    assert none == SimulationResources(0.0, "")


@pytest.mark.parametrize(
    ("num_gpus", "address", "device", "visible", "message"),
    [
        ("0.5", "", "auto", 0, "no GPU is visible here"),
        ("auto", "", "cuda", 0, "no CUDA GPU is visible here"),
        ("0", "", "cuda:0", 1, "give each a share, e.g. --num-gpus 0.25"),
        ("1.5", "", "auto", 1, "a whole number of GPUs per node"),
        ("-1", "", "auto", 1, "--num-gpus '-1'"),
        ("many", "", "auto", 1, "--num-gpus 'many'"),
        ("auto", "10.0.0.5", "auto", 1, "is not HOST:PORT"),
        ("auto", "10.0.0.5:99999", "auto", 1, "is not HOST:PORT"),
        ("2", "", "auto", 1, "each node would need 2 GPUs and 1 are visible"),
        ("auto", "127.0.0.1:1", "auto", 1, "nothing answers there"),
    ],
)
def test_a_run_that_cannot_get_its_gpus_is_refused_in_one_line(
    gpus, num_gpus, address, device, visible, message
):
    # Prepare
    gpus(visible)

    # Execute
    with pytest.raises(ConfigError) as refused:
        plan_resources(num_gpus, address, device, supernodes=4, num_cpus=1.0)

    # Assert
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_cluster_address_and_the_gpu_share_reach_flower(monkeypatch):
    # Prepare: the cluster answers
    monkeypatch.setattr(resources, "check_reachable", lambda address: None)

    # Execute
    remote = plan_resources("0.25", "ray://10.0.0.5:10001", "cuda", supernodes=4, num_cpus=1.0)
    with pytest.raises(ConfigError, match="on a Ray cluster: give each node GPUs"):
        plan_resources("auto", "10.0.0.5:6379", "cuda", supernodes=4, num_cpus=1.0)
    command = flwr_run_command(APP_DIR, 4, "", 1.0, num_gpus=remote.num_gpus)

    # Assert
    assert remote == SimulationResources(0.25, "ray://10.0.0.5:10001")
    federation = command[command.index("--federation-config") + 1]
    assert "client-resources-num-gpus=0.25" in federation.split()
    assert "num-gpus" not in flwr_run_command(APP_DIR, 4, "", 1.0)[-2]


def test_device_cuda_without_a_gpu_is_refused_before_anything_starts(tmp_path):
    # Execute: this machine has no GPU visible (or the share is refused first)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.launch.simulation",
            "--flwr-home",
            str(tmp_path / "flwr_home"),
            "--num-gpus",
            "0",
            "--run-config",
            run_config_text({"device": "cuda", "runs-dir": str(tmp_path / "runs")}),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=APP_DIR,
        check=False,
    )

    # Assert: exit 2, one line, no SuperLink started
    assert result.returncode == EXIT_CONFIG, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "device='cuda'" in lines[0]
    assert not (tmp_path / "flwr_home").exists()


@pytest.fixture()
def ray_cluster(tmp_path):
    """A one-node Ray cluster of the test's own, stopped by PID (never `ray stop`)."""
    port = free_port()
    ray_temp = tempfile.mkdtemp(prefix="fc-ray-", dir="/tmp")
    log = open(tmp_path / "ray-head.log", "wb")  # noqa: SIM115 - closed in finally
    head = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={ray_temp}",  # short: Ray's socket paths must fit 107 bytes
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in (tmp_path / "ray-head.log").read_bytes():
            assert head.poll() is None, (tmp_path / "ray-head.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "ray start --head did not come up in 120 s"
            time.sleep(0.5)
        yield head, f"127.0.0.1:{port}", ray_temp
    finally:
        stop_tree(head)
        log.close()
        shutil.rmtree(ray_temp, ignore_errors=True)


@pytest.mark.slow
def test_a_simulation_runs_on_the_users_ray_cluster_and_leaves_it_running(tmp_path, ray_cluster):
    # Prepare
    head, address, ray_temp = ray_cluster
    flwr_home = tmp_path / "flwr_home"

    # Execute: 2 nodes, 1 round, on the cluster
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.launch.simulation",
            "--supernodes",
            "2",
            "--ray-address",
            address,
            "--flwr-home",
            str(flwr_home),
            "--run-config",
            run_config_text(
                {"num-server-rounds": 1, "runs-dir": str(tmp_path / "runs"), "run-name": "ray"}
            ),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=APP_DIR,
        env={**os.environ, "FEDCOORD_HOME": str(tmp_path / "home")},
        check=False,
    )

    # Assert: completed, on the existing cluster, which is still running afterwards
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    drivers = list(Path(ray_temp).glob("session_*/logs/python-core-driver-*"))
    assert drivers, "the simulation did not connect to the cluster as a Ray driver"
    assert head.poll() is None and process_alive(head.pid)


def test_a_connection_asking_gpus_none_are_visible_for_is_refused(gpus):
    from server.launch.connection import validate_settings

    # Prepare
    gpus(0)

    # Execute / Assert
    with pytest.raises(ConfigError, match="no GPU is visible here"):
        validate_settings("fedcoord-local", 4, 1.0, 1.0)
    assert validate_settings("fedcoord-local", 4, 1.0, 0.0).num_gpus == 0.0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_the_serverapp_refuses_a_device_it_lacks_in_one_line():
    from server.app import make_central_evaluate
    from task.config import parse_run_config
    from task.datasets import load_digits_splits

    with pytest.raises(ConfigError, match="Device 'cuda': CUDA is not available here"):
        make_central_evaluate(parse_run_config({"device": "cuda"}), load_digits_splits(0))
