"""``fedcoord connection``: a simulation connection for Flower's own ``flwr run``.

``flwr run .`` with Flower's defaults uses the ``local`` connection (``address =
":local:"``): it starts a detached ``flower-superlink --simulation`` on ports
39091 / 39093 that outlives it, with runtime dependency installation on, so each
run's ServerApp first runs ``uv sync`` on the app into a fresh environment
(downloading torch), and 2 simulated nodes of 2 CPUs each. Runtime installation
is off only when ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` is in the
environment of the ``flwr`` command that happens to start that SuperLink.

Here the SuperLink is started once, detached as Flower's own, from this venv, on
free ports, with runtime dependency installation off. Connection ``NAME`` in
``$FLWR_HOME/config.toml`` points at it (written by Flower's own config writer),
and the simulated nodes and their resources are set on the SuperLink's
federation with Flower's ``flwr federation simulation-config`` (the
``options.*`` keys of a connection are deprecated in Flower 1.42: each ``flwr
run`` would warn). ``flwr run . NAME --stream``, ``flwr ls NAME``, ``flwr log RUN
NAME`` and ``flwr stop RUN NAME`` then work as Flower documents them; the
SuperLink's PID is kept beside it, and ``--stop`` stops it (and its simulation)
by that PID.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.launch.processes import flwr_env, free_port, process_alive, stop_pid_tree, stop_tree
from server.launch.resources import check_nodes, plan_resources
from server.launch.run_options import DEFAULT_CONNECTION_NAME
from server.launch.simulation import superlink_command, wait_healthy
from task.config import ConfigError

DEFAULT_NAME = DEFAULT_CONNECTION_NAME
FLOWER_NAMES = ("local", "supergrid", "default")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


@dataclass(frozen=True)
class SimulationSettings:
    """What connection ``name`` asks of the simulation: nodes and each one's resources."""

    name: str = DEFAULT_NAME
    supernodes: int = 10
    num_cpus: int = 1
    num_gpus: float = 0.0


@dataclass(frozen=True)
class RunningSuperLink:
    """A SuperLink started for a connection, as its PID file records it."""

    pid: int
    http_port: int

    @property
    def address(self) -> str:
        """The address ``flwr`` connects to."""
        return f"127.0.0.1:{self.http_port}"


def validate_settings(
    name: str, supernodes: int, num_cpus: float, num_gpus: float
) -> SimulationSettings:
    """The settings of a connection, or the first problem.

    Raises
    ------
    ConfigError
        For a name Flower's config cannot hold or that is Flower's own, fewer than
        1 node, CPUs that are not a whole number >= 1 (Flower's simulation config
        holds an integer), or a GPU share below 0.
    """
    if not _NAME.fullmatch(name) or name in FLOWER_NAMES:
        raise ConfigError(
            f"--name {name!r}: a connection name is letters, digits, '-' and '_' (at most 63), "
            f"not Flower's own {', '.join(FLOWER_NAMES)}"
        )
    cpus = check_nodes(supernodes, num_cpus)
    if not (math.isfinite(num_gpus) and num_gpus >= 0):
        raise ConfigError(
            f"--num-gpus must be a GPU share >= 0 per node, e.g. 0.25, got {num_gpus:g}"
        )
    if num_gpus > 0:  # the launcher's check: Ray would wait forever for GPUs not there
        plan_resources(f"{num_gpus:g}", "", "auto", supernodes, float(cpus))
    return SimulationSettings(name, supernodes, cpus, num_gpus)


def superlink_dir(flwr_home: Path, name: str) -> Path:
    """Where connection ``name`` keeps its SuperLink's PID file and log."""
    return flwr_home / f"{name}-superlink"


def running_superlink(flwr_home: Path, name: str) -> RunningSuperLink | None:
    """The SuperLink of connection ``name`` if its PID file names one that runs and answers.

    The PID is trusted only if that process is a ``flower-superlink`` on the recorded
    port (a PID file outlives a reboot; its number may be another process's now).
    """
    try:
        pid_text, port_text = (superlink_dir(flwr_home, name) / "superlink.pid").read_text().split()
        link = RunningSuperLink(int(pid_text), int(port_text))
        arguments = Path(f"/proc/{link.pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    ours = any(arg.endswith(b"flower-superlink") for arg in arguments[:2])
    if not (ours and str(link.http_port).encode() in arguments and process_alive(link.pid)):
        return None
    try:
        healthy = httpx.get(f"http://{link.address}/health", timeout=2.0).is_success
    except httpx.HTTPError:
        healthy = False
    return link if healthy else None


def start_superlink(flwr_home: Path, name: str) -> RunningSuperLink:
    """Start a detached simulation SuperLink for connection ``name``; record its PID and port.

    Raises
    ------
    RuntimeError
        If it does not become healthy (it is stopped then), naming its log.
    """
    folder = superlink_dir(flwr_home, name)
    folder.mkdir(parents=True, exist_ok=True)
    http_port, control_port = free_port(), free_port()
    log_file = folder / "superlink.log"
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            superlink_command(http_port, control_port, log_file),
            env=flwr_env(flwr_home),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_healthy(process, http_port, log_file)
    except BaseException:
        stop_tree(process)
        raise
    (folder / "superlink.pid").write_text(f"{process.pid} {http_port}\n")
    return RunningSuperLink(process.pid, http_port)


def stop_superlink(flwr_home: Path, name: str) -> str:
    """Stop the SuperLink of connection ``name`` and its simulation, by PID; say what was done."""
    link = running_superlink(flwr_home, name)
    (superlink_dir(flwr_home, name) / "superlink.pid").unlink(missing_ok=True)
    if link is None:
        return f"no SuperLink of connection {name!r} is running under {flwr_home}"
    stop_pid_tree(link.pid)
    return f"stopped the SuperLink of connection {name!r} (pid {link.pid}, {link.address})"


@contextmanager
def _flwr_home(flwr_home: Path) -> Iterator[None]:
    """``FLWR_HOME`` for Flower's config functions, which read it from the environment."""
    previous = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(flwr_home)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["FLWR_HOME"]
        else:
            os.environ["FLWR_HOME"] = previous


def write_simulation_connection(flwr_home: Path, name: str, address: str) -> Path:
    """Add or replace connection ``name`` in ``flwr_home/config.toml``, Flower's way.

    Flower's default connections are written first when the file does not exist;
    every other connection in it is kept.

    Raises
    ------
    ConfigError
        If the existing config.toml cannot be read.
    """
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML, FLOWER_CONFIG_FILE
    from flwr.cli.flower_config import write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection

    path = flwr_home / FLOWER_CONFIG_FILE
    if not path.exists():
        flwr_home.mkdir(parents=True, exist_ok=True)
        path.write_text(DEFAULT_FLOWER_CONFIG_TOML)
    with _flwr_home(flwr_home):
        try:
            write_superlink_connection(SuperLinkConnection(name, address, insecure=True))
        except Exception as error:  # click's exception for a config.toml it cannot read
            message = getattr(error, "message", str(error))
            raise ConfigError(f"{path}: {message}") from None
    return path


def simulation_config_command(settings: SimulationSettings) -> list[str]:
    """Flower's command that sets the nodes and resources of the SuperLink's federation."""
    from flwr.supercore.constant import NOOP_FEDERATION_ID

    return [
        str(Path(sys.executable).with_name("flwr")),
        "federation",
        "simulation-config",
        NOOP_FEDERATION_ID,
        settings.name,
        "--num-supernodes",
        str(settings.supernodes),
        "--client-resources-num-cpus",
        str(settings.num_cpus),
        "--client-resources-num-gpus",
        f"{settings.num_gpus:g}",
        "--format",
        "json",
    ]


def configure_simulation(flwr_home: Path, settings: SimulationSettings) -> None:
    """Set the simulated nodes and their resources on the connection's SuperLink.

    Raises
    ------
    RuntimeError
        If Flower's command fails, with the last line it wrote.
    """
    result = subprocess.run(
        simulation_config_command(settings),
        env=flwr_env(flwr_home),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        said = (result.stdout + result.stderr).strip().splitlines() or ["no output"]
        raise RuntimeError(f"flwr federation simulation-config failed: {said[-1]}")


def set_up_connection(
    flwr_home: Path, settings: SimulationSettings
) -> tuple[RunningSuperLink, bool]:
    """Start (or keep) the connection's SuperLink, write the connection, set the nodes.

    Returns the SuperLink and whether it was running already. A SuperLink started
    here is stopped again if the rest fails.
    """
    link = running_superlink(flwr_home, settings.name)
    reused = link is not None
    if link is None:
        link = start_superlink(flwr_home, settings.name)
    try:
        write_simulation_connection(flwr_home, settings.name, link.address)
        configure_simulation(flwr_home, settings)
    except BaseException:
        if not reused:
            stop_superlink(flwr_home, settings.name)
        raise
    return link, reused


def connection_lines(
    flwr_home: Path, settings: SimulationSettings, link: RunningSuperLink, reused: bool
) -> list[str]:
    """What was set up and the Flower commands that use it."""
    from flwr.supercore.utils import get_flwr_home

    name = settings.name
    env = "" if get_flwr_home().absolute() == flwr_home else f"FLWR_HOME={flwr_home} "
    # This venv's commands, so that they run as printed without activating it
    flwr, fedcoord = (str(Path(sys.executable).with_name(tool)) for tool in ("flwr", "fedcoord"))
    started = "running already" if reused else "started"
    gpus = f" and {settings.num_gpus:g} GPU" if settings.num_gpus > 0 else ""
    return [
        f"connection {name!r} in {flwr_home / 'config.toml'}: {settings.supernodes} simulated "
        f"nodes, {settings.num_cpus} CPU{gpus} each, on a simulation SuperLink at "
        f"{link.address} ({started}, pid {link.pid}; runtime dependency installation off; "
        f"log {superlink_dir(flwr_home, name) / 'superlink.log'})",
        "run from the app's folder:",
        f"  {env}{flwr} run . {name} --stream",
        f"  {env}{flwr} ls {name}   |   {env}{flwr} log RUN_ID {name}   |   "
        f"{env}{flwr} stop RUN_ID {name}",
        f"the SuperLink keeps running: stop it with {fedcoord} connection --stop --name {name}"
        + (f" --flwr-home {flwr_home}" if env else "")
        + f" (or kill {link.pid})",
    ]


def run_connection(args: argparse.Namespace) -> int:
    """``fedcoord connection``; exit 0 set up (or stopped), 1 no SuperLink, 2 bad settings.

    ``args`` holds the options of :func:`server.launch.run_options.add_connection_arguments`.
    """
    from flwr.supercore.utils import get_flwr_home

    flwr_home = Path(args.flwr_home or get_flwr_home()).expanduser().absolute()
    if args.stop:
        print(stop_superlink(flwr_home, args.name), flush=True)
        return 0
    try:
        settings = validate_settings(args.name, args.supernodes, args.num_cpus, args.num_gpus)
        link, reused = set_up_connection(flwr_home, settings)
    except ConfigError as error:
        print(f"fedcoord: {error}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as error:  # the SuperLink did not start
        print(f"fedcoord: {error}", file=sys.stderr, flush=True)
        return 1
    print("\n".join(connection_lines(flwr_home, settings, link, reused)), flush=True)
    return 0
