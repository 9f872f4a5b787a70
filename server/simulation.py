"""Run the app in Flower simulation on a SuperLink this process starts and stops.

``flwr run`` with the ``:local:`` connection starts a detached SuperLink that
outlives it, on fixed ports. Here the SuperLink is started on ports of our
choosing, under a FLWR_HOME of our choosing, with runtime dependency
installation disabled, and stopped by its PID when the run ends, fails or is
interrupted.

Usage::

    python -m server.simulation --supernodes 10 --run-config "num-server-rounds=3"
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

CONNECTION_NAME = "fedcoord-sim"
STARTUP_TIMEOUT_S = 60.0


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower processes: our FLWR_HOME, no runtime installs."""
    env = os.environ.copy()
    # Flower starts its helpers (flower-superexec, flwr-simulation) by name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def write_connection(flwr_home: Path, address: str) -> None:
    """Write FLWR_HOME/config.toml with one insecure connection, the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
        f'[superlink.{CONNECTION_NAME}]\naddress = "{address}"\ninsecure = true\n'
    )


def _wait_healthy(process: subprocess.Popen[bytes], port: int, log_file: Path) -> None:
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


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid``, read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


def stop_tree(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Stop a process we started and every process it started, by PID.

    Flower detaches its SuperExec (a new session), which starts the simulation
    and Ray; some Ray agents outlive their parent. The tree is read before the
    root is stopped, and whatever of it is still alive after ``grace_s`` is killed.
    """
    tree = descendants(process.pid)
    stop_process(process, grace_s)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid in tree if _alive(pid)]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + grace_s
        while any(_alive(pid) for pid in alive) and time.monotonic() < deadline:
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Stop a process group we started: SIGTERM, then SIGKILL after ``grace_s``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_s)


@contextmanager
def local_superlink(flwr_home: Path) -> Iterator[LocalSuperLink]:
    """Start a simulation SuperLink under ``flwr_home``; stop it (by PID) on exit.

    The SuperLink runs in its own process group so that the simulation
    processes it spawns (``flwr-simulation``, Ray) are stopped with it.
    """
    flwr_home = flwr_home.resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    http_port, control_port = free_port(), free_port()
    log_file = flwr_home / "superlink.log"
    command = [
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
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            command,
            env=flwr_env(flwr_home),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    link = LocalSuperLink(process, flwr_home, http_port, control_port)
    try:
        _wait_healthy(process, http_port, log_file)
        write_connection(flwr_home, link.address)
        yield link
    finally:
        stop_tree(process)


def flwr_run_command(
    app_dir: Path, supernodes: int, run_config: str, num_cpus: float, stream: bool = True
) -> list[str]:
    """The ``flwr run`` command line for a simulation with ``supernodes`` nodes."""
    federation = f"num-supernodes={supernodes} client-resources-num-cpus={num_cpus:g}"
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


def run_simulation(
    app_dir: Path, flwr_home: Path, supernodes: int, run_config: str, num_cpus: float = 1.0
) -> int:
    """Run the app to completion on a fresh SuperLink; return ``flwr run``'s exit code."""
    with local_superlink(flwr_home) as link:
        command = flwr_run_command(app_dir, supernodes, run_config, num_cpus)
        process = subprocess.Popen(command, env=link.env(), start_new_session=True)
        try:
            return process.wait()
        finally:
            stop_process(process)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: run a simulation and clean up whatever happens."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default=".", help="the Flower app folder (pyproject.toml)")
    parser.add_argument("--supernodes", type=int, default=10, help="simulated nodes")
    parser.add_argument("--run-config", default="", help='e.g. "num-server-rounds=3"')
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per simulated node")
    parser.add_argument("--flwr-home", default=".flwr_home", help="FLWR_HOME for this run")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run_simulation(
            Path(args.app).resolve(),
            Path(args.flwr_home),
            args.supernodes,
            args.run_config,
            args.num_cpus,
        )
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
