"""Run the app in Flower simulation on a SuperLink this process starts and stops.

``flwr run`` with the ``:local:`` connection starts a detached SuperLink that
outlives it, on fixed ports. Here the SuperLink is started on ports of our
choosing, under a FLWR_HOME of our choosing, with runtime dependency
installation disabled, and stopped by its PID when the run ends, fails or is
interrupted.

The run-config is checked before anything starts (a bad value: one line, exit 2),
and the exit code says how the run ended: 0 completed, 1 failed, 3 stopped, 130
interrupted with Ctrl-C.

Usage (``fedcoord run`` takes the same options)::

    python -m server.launch.simulation --supernodes 10 --run-config "num-server-rounds=3"
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.launch.processes import flwr_env, free_port, stop_process, stop_tree
from server.launch.resources import SimulationResources, check_nodes, plan_resources
from server.launch.run_options import add_run_arguments
from server.preflight import check_resumable_exists, check_run_name_free, parse_app_run_config
from server.record.runs import run_status
from server.record.store import DB_NAME, RunStoreError
from task.config import ConfigError, make_run_name

CONNECTION_NAME = "fedcoord-sim"
STARTUP_TIMEOUT_S = 60.0
# Seconds to wait, after ``flwr run`` returns, for the run store to show a final state.
FINAL_STATE_WAIT_S = 10.0
FINAL_STATES = ("completed", "failed", "stopped")
DEBUG_ENV = "FEDCOORD_DEBUG"
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


@dataclass(frozen=True)
class LocalSuperLink:
    """A running simulation SuperLink and how to reach it."""

    process: subprocess.Popen[bytes]
    flwr_home: Path
    http_port: int
    control_port: int

    @property
    def address(self) -> str:
        """The HTTP API address ``flwr`` connects to."""
        return f"127.0.0.1:{self.http_port}"

    def env(self) -> dict[str, str]:
        """Environment for ``flwr`` commands against this SuperLink."""
        return flwr_env(self.flwr_home)


def write_connection(flwr_home: Path, address: str) -> None:
    """Write FLWR_HOME/config.toml with one insecure connection, the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
        f'[superlink.{CONNECTION_NAME}]\naddress = "{address}"\ninsecure = true\n'
    )


def superlink_command(http_port: int, control_port: int, log_file: Path) -> list[str]:
    """``flower-superlink`` for simulation on 127.0.0.1, runtime dependency installation off.

    Flower's ``:local:`` SuperLink, but on the ports given and from this environment
    (its ServerApp and simulation run with this venv's packages, nothing is installed).
    """
    return [
        str(Path(sys.executable).with_name("flower-superlink")),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(http_port),
        "--control-api-address",
        f"127.0.0.1:{control_port}",
        "--log-file",
        str(log_file),
    ]


def wait_healthy(process: subprocess.Popen[bytes], port: int, log_file: Path) -> None:
    """Wait until the SuperLink ``process`` answers on ``port``.

    Raises
    ------
    RuntimeError
        If it exits or is not healthy within ``STARTUP_TIMEOUT_S``, naming its log.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"flower-superlink exited with code {process.returncode}; see {log_file}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(
        f"flower-superlink not healthy after {STARTUP_TIMEOUT_S:.0f}s; see {log_file}"
    )


@contextmanager
def local_superlink(
    flwr_home: Path, extra_env: Mapping[str, str] | None = None
) -> Iterator[LocalSuperLink]:
    """Start a simulation SuperLink under ``flwr_home``; stop it (by PID) on exit.

    The SuperLink runs in its own process group so that the simulation
    processes it spawns (``flwr-simulation``, Ray) are stopped with it.
    """
    flwr_home = flwr_home.resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    http_port, control_port = free_port(), free_port()
    log_file = flwr_home / "superlink.log"
    command = superlink_command(http_port, control_port, log_file)
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            command,
            env={**flwr_env(flwr_home), **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    link = LocalSuperLink(process, flwr_home, http_port, control_port)
    try:
        wait_healthy(process, http_port, log_file)
        write_connection(flwr_home, link.address)
        yield link
    finally:
        stop_tree(process)


def flwr_run_command(
    app_dir: Path,
    supernodes: int,
    run_config: str,
    num_cpus: float,
    stream: bool = True,
    num_gpus: float = 0.0,
) -> list[str]:
    """The ``flwr run`` command line for a simulation with ``supernodes`` nodes.

    ``num_gpus`` > 0 asks Ray for that share of a GPU per simulated node: Ray hides
    every GPU from a node that asks for none (``CUDA_VISIBLE_DEVICES=''``).
    """
    federation = f"num-supernodes={supernodes} client-resources-num-cpus={num_cpus:g}"
    if num_gpus > 0:
        federation += f" client-resources-num-gpus={num_gpus:g}"
    command = [
        str(Path(sys.executable).with_name("flwr")),
        "run",
        str(app_dir),
        CONNECTION_NAME,
        "--federation-config",
        federation,
    ]
    if run_config.strip():
        command += ["--run-config", run_config]
    if stream:
        command.append("--stream")
    return command


def run_simulation(  # noqa: PLR0913
    app_dir: Path,
    flwr_home: Path,
    supernodes: int,
    run_config: str,
    num_cpus: float = 1.0,
    resources: SimulationResources | None = None,
) -> int:
    """Run the app to completion on a fresh SuperLink; return ``flwr run``'s exit code.

    With ``resources.ray_address`` the simulation joins that Ray cluster (Ray's
    ``RAY_ADDRESS``); the cluster is the user's: it is never started or stopped here.
    """
    resources = resources or SimulationResources()
    extra_env = {"RAY_ADDRESS": resources.ray_address} if resources.ray_address else {}
    with local_superlink(flwr_home, extra_env) as link:
        command = flwr_run_command(
            app_dir, supernodes, run_config, num_cpus, num_gpus=resources.num_gpus
        )
        process = subprocess.Popen(command, env=link.env(), start_new_session=True)
        try:
            return process.wait()
        finally:
            stop_process(process)


@dataclass(frozen=True)
class PlannedRun:
    """A run checked before Flower starts: its run-config text and run directory."""

    run_config: str
    run_dir: Path
    previous_flwr_run_id: str | None
    device: str = "auto"


def plan_run(app_dir: Path, run_config: str, supernodes: int | None = None) -> PlannedRun:
    """Validate the run-config and the run directory; name the run if it has no name.

    ``supernodes``, the simulated nodes, lets a privacy budget be checked for every
    sampling (:func:`server.preflight.check_budget_covers_a_round`).

    Raises
    ------
    ConfigError
        With the one-line message of the first problem.
    """
    config = parse_app_run_config(app_dir, run_config, population=supernodes)
    run_name = config.run_name
    if config.resume:
        check_resumable_exists(config)
    else:
        run_name = run_name or make_run_name()
        check_run_name_free(config, run_name)
        if not config.run_name:
            run_config = f"{run_config} run-name='{run_name}'".strip()
    run_dir = config.resolved_runs_dir / run_name
    return PlannedRun(run_config, run_dir, _flwr_run_id(run_dir), config.device)


def _read_status(run_dir: Path) -> dict[str, object] | None:
    """``run_dir``'s status, None if it has no run store or one that cannot be read."""
    if not (run_dir / DB_NAME).exists():
        return None
    try:
        return run_status(run_dir)
    except (RunStoreError, sqlite3.Error):
        return None


def _flwr_run_id(run_dir: Path) -> str | None:
    """The Flower run id recorded in ``run_dir``'s run store, None if there is none."""
    status = _read_status(run_dir)
    return None if status is None else str(status["flwr_run_id"])


def run_outcome(planned: PlannedRun, wait_s: float = FINAL_STATE_WAIT_S) -> tuple[int, str]:
    """Exit code and closing line for the run, read from its run store.

    0 for ``completed`` (no closing line: the run logged its final accuracy),
    3 for ``stopped``, 1 for anything else, with the reason.
    """
    name = planned.run_dir.name
    deadline = time.monotonic() + wait_s
    while True:
        status = _read_status(planned.run_dir)
        if status is None or str(status["flwr_run_id"]) == planned.previous_flwr_run_id:
            return EXIT_FAILED, f"run {name} did not start; the ServerApp's log above says why"
        state = str(status["state"])
        if state in FINAL_STATES or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    message = str(status["message"] or "")
    if state == "completed":
        return EXIT_OK, ""
    if state == "stopped":
        return EXIT_STOPPED, f"run {name} stopped after round {status['current_round']}: {message}"
    return EXIT_FAILED, f"run {name} {state}: {message or 'see the log above'}"


def launch(args: argparse.Namespace) -> int:
    """Check the config, run the simulation, and map the run's final state to an exit code."""
    app_dir = Path(args.app).resolve()
    try:
        check_nodes(args.supernodes, args.num_cpus)
        planned = plan_run(app_dir, args.run_config, args.supernodes)
    except ConfigError as error:
        _say(str(error))
        return EXIT_CONFIG
    try:
        resources = plan_resources(
            args.num_gpus, args.ray_address, planned.device, args.supernodes, args.num_cpus
        )
    except ConfigError as error:
        _say(str(error))
        return EXIT_CONFIG
    try:
        run_simulation(
            app_dir,
            Path(args.flwr_home),
            args.supernodes,
            planned.run_config,
            args.num_cpus,
            resources,
        )
    except KeyboardInterrupt:
        _say(
            f"interrupted: run {planned.run_dir.name} ended with its SuperLink; continue it with "
            f"RUN_CONFIG=\"run-name='{planned.run_dir.name}' resume=true\""
        )
        return EXIT_INTERRUPTED
    except RuntimeError as error:  # the SuperLink did not start
        _say(str(error))
        return EXIT_FAILED
    code, line = run_outcome(planned)
    if line:
        _say(line)
    return code


def _say(line: str) -> None:
    print(f"fedcoord: {line}", file=sys.stderr, flush=True)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the simulation ``args`` describe and clean up whatever happens.

    ``args`` holds the options of :func:`server.launch.run_options.add_run_arguments`.
    Exit codes: 0 completed, 1 failed (or did not start), 2 bad run-config,
    3 stopped, 130 Ctrl-C.
    """
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return launch(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry, the same run as ``fedcoord run``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
