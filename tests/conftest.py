"""Shared fixtures: a real simulation SuperLink per test session, stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from server.launch.simulation import LocalSuperLink, flwr_run_command, local_superlink

APP_DIR = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 900

# Debian packages some tests use, and how to tell that each is installed.
# `make system-deps` (run by `make test`) installs the missing ones when root.
SYSTEM_PACKAGES: dict[str, Callable[[], bool]] = {
    "chromium": lambda: Path("/usr/bin/chromium").is_file(),
    "iproute2": lambda: shutil.which("ip") is not None,
    # The SuperLink's proxy (deploy/proxy.py); Debian installs it in /usr/sbin.
    "nginx": lambda: shutil.which("nginx") is not None or Path("/usr/sbin/nginx").is_file(),
    "dataset-fashion-mnist": lambda: Path(
        "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
    ).is_file(),
}
_skipped_for_packages: dict[str, int] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "system_package(name): needs a Debian package (make system-deps installs it)",
    )


def missing_package_message(package: str) -> str:
    """One line naming the missing Debian package and the command that installs it."""
    return (
        f"needs the Debian package {package}: run `sudo make system-deps` "
        f"(or apt-get install {package})"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip (fail under CI=true) a test whose Debian package is missing."""
    for marker in item.iter_markers("system_package"):
        package = str(marker.args[0])
        if SYSTEM_PACKAGES[package]():
            continue
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: {missing_package_message(package)}", pytrace=False)
        _skipped_for_packages[package] = _skipped_for_packages.get(package, 0) + 1
        pytest.skip(missing_package_message(package))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _skipped_for_packages:
        total = sum(_skipped_for_packages.values())
        packages = " ".join(sorted(_skipped_for_packages))
        terminalreporter.write_line(
            f"{total} test(s) skipped: missing Debian packages {packages}; "
            "install them with `sudo make system-deps`",
            yellow=True,
        )


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


@pytest.fixture()
def server_identity() -> Iterator[None]:
    """Message() reads the ServerApp's identity, as Flower sets it in a ServerApp process.

    Modules that build Messages outside a ServerApp use it for every test:
    ``pytestmark = pytest.mark.usefixtures("server_identity")``.
    """
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="session")
def superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSuperLink]:
    """A simulation SuperLink with its own FLWR_HOME and ports, stopped after the session."""
    with local_superlink(tmp_path_factory.mktemp("flwr_home")) as link:
        yield link


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


@pytest.fixture()
def simulate(superlink: LocalSuperLink, tmp_path: Path):  # noqa: ANN201
    """Run the app in simulation: ``simulate(supernodes, run_name, wait=True, **run_config)``."""

    def run(supernodes: int, run_name: str, wait: bool = True, **run_config: object):  # noqa: ANN202
        return run_flwr_simulation(
            superlink, tmp_path / "runs", supernodes, run_name, run_config, wait=wait
        )

    return run
