"""Shared fixtures and hooks: a real simulation SuperLink per test session, stopped by PID.

Plain helpers (the CLI, simulations, fake Grids, made-up runs) are in helpers.py.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from server.launch.simulation import LocalSuperLink, local_superlink
from tests.helpers import run_flwr_simulation

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


def pytest_collection_finish(session: pytest.Session) -> None:
    """Train and evaluate with one torch thread in this process.

    The tests' models and batches are tiny: a second thread gains nothing, and on
    a busy 2-core machine threads waiting for each other made the training tests
    10 times slower. Subprocesses (simulations, the CLI) keep torch's default.
    """
    torch = sys.modules.get("torch")  # imported by the collected modules, if any needs it
    if torch is not None:
        torch.set_num_threads(1)


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


@pytest.fixture()
def simulate(superlink: LocalSuperLink, tmp_path: Path):  # noqa: ANN201
    """Run the app in simulation: ``simulate(supernodes, run_name, wait=True, **run_config)``."""

    def run(supernodes: int, run_name: str, wait: bool = True, **run_config: object):  # noqa: ANN202
        return run_flwr_simulation(
            superlink, tmp_path / "runs", supernodes, run_name, run_config, wait=wait
        )

    return run
