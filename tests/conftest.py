"""Shared fixtures: a real simulation SuperLink per test session, stopped by PID."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.simulation import LocalSuperLink, flwr_run_command, local_superlink

APP_DIR = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 900


@dataclass
class SimulationRun:
    """The outcome of one ``flwr run`` in simulation."""

    returncode: int
    output: str
    run_dir: Path

    def status(self) -> dict[str, object]:
        """``fedcoord status --json`` for this run."""
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "server.cli",
                "--runs-dir",
                str(self.run_dir.parent),
                "status",
                self.run_dir.name,
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=APP_DIR,
        )
        return json.loads(result.stdout)


@pytest.fixture(scope="session")
def superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSuperLink]:
    """A simulation SuperLink with its own FLWR_HOME and ports, stopped after the session."""
    with local_superlink(tmp_path_factory.mktemp("flwr_home")) as link:
        yield link


@pytest.fixture()
def simulate(superlink: LocalSuperLink, tmp_path: Path):  # noqa: ANN201
    """Run the app in simulation: ``simulate(supernodes, run_name, **run_config)``."""

    def run(supernodes: int, run_name: str, **run_config: object) -> SimulationRun:
        runs_dir = tmp_path / "runs"
        settings = {"run-name": run_name, "runs-dir": str(runs_dir), **run_config}
        overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())
        command = flwr_run_command(APP_DIR, supernodes, overrides, num_cpus=1)
        result = subprocess.run(
            command,
            env=superlink.env(),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            cwd=APP_DIR,
        )
        return SimulationRun(result.returncode, result.stdout + result.stderr, runs_dir / run_name)

    return run
