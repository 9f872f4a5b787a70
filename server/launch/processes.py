"""Processes fedcoord starts: free ports, Flower's environment, stopping by PID.

Shared by the simulation launcher, the sweep, ``deploy/`` and ``bench/``: every
process tree we start is stopped by its PID (never by name), its children read
from /proc before the root is stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower processes: our FLWR_HOME, no runtime installs, no gRPC APIs."""
    env = os.environ.copy()
    # Flower starts its helpers (flower-superexec, flwr-simulation) by name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # A Ray cluster is joined only when asked for (--ray-address), never inherited.
    env.pop("RAY_ADDRESS", None)
    # Flower's internal switches that reopen its gRPC APIs on all addresses.
    for key in [key for key in env if key.startswith("FLWR_INTERNAL_GRPC_")]:
        del env[key]
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


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
    _stop_pids(tree, grace_s)


def stop_pid_tree(pid: int, grace_s: float = 10.0) -> None:
    """Stop process ``pid`` (not our child: one a command before us started) and its tree.

    As :func:`stop_tree`: the tree is read first; SIGTERM, then SIGKILL after ``grace_s``.
    """
    tree = descendants(pid)
    _stop_pids([pid], grace_s)
    _stop_pids(tree, grace_s)


def _stop_pids(pids: list[int], grace_s: float) -> None:
    for signum in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid in pids if process_alive(pid)]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + grace_s
        while any(process_alive(pid) for pid in alive) and time.monotonic() < deadline:
            time.sleep(0.1)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux /proc)."""
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
