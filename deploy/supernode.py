"""Start one SuperNode: check first, then run Flower's SuperNode and a warm ClientApp worker.

``python -m deploy supernode`` is the process a node operator starts and stops.
It checks what it can before Flower starts (the node's data, its key, that the
SuperLink is reachable and its certificate fits the address), then runs two
children and watches them:

- Flower's SuperNode (``deploy.flower_supernode``: ``flower-supernode`` with a
  short idle poll), with ``--isolation process``;
- the ClientApp worker (``deploy.worker``), a long-lived process that runs every
  ClientApp call, so imports, data and the CUDA context stay warm, and runs only
  the app builds the node's operator allowed (``--allow-app HASH``, or
  ``--allow-any-app``).

``--isolation subprocess`` runs Flower's default instead (a ``flwr-clientapp``
process per message, for every app build: it needs ``--allow-any-app``).
SIGTERM / Ctrl-C stop both children; the SuperNode then tells the SuperLink it
is leaving.

A node stopped hard (kill -9, power loss) stays "online" on the SuperLink until
two heartbeat intervals pass, and the SuperLink refuses to activate it again
until then. The node remembers that it was online (a marker in FLWR_HOME,
refreshed while it runs), and on restart keeps retrying the activation until the
SuperLink has let go of the old session. Without the marker a refusal means the
key is not registered, and it says so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

from client.local_data import read_local_arrays
from deploy.apps import AppAllowList
from deploy.certs import load_node_private_key
from deploy.checks import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DeployError,
    check_superlink_insecure,
    check_superlink_tls,
)
from server.launch.processes import flwr_env

# Seconds between the SuperNode's pulls when it has no message (Flower: 3 s). Each
# phase of a round waits half of it on average; each pull is one HTTPS request.
DEFAULT_NODE_POLL_S = 0.2
ONLINE_MARKER = "fedcoord-supernode-online.json"
MARKER_REFRESH_S = 5.0
REJOIN_RETRY_S = 3.0
ACTIVATION_REFUSED = "Failed to activate SuperNode"
NODE_ID_LINE = "SuperNode ID:"
EXIT_NOT_REGISTERED = 3
WORKER_CRASH_LIMIT = 3


@dataclass(frozen=True)
class NodeSettings:
    """Everything one SuperNode needs; built from the command line."""

    superlink: str
    ca_cert: Path | None
    auth_key: Path | None
    node_config: str
    port: int
    flwr_home: Path
    isolation: str = "warm"
    poll_interval_s: float = DEFAULT_NODE_POLL_S
    heartbeat_interval_s: float = 30.0
    gpu: str | None = None
    cpu_threads: int | None = None
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    extra_flower_args: tuple[str, ...] = ()
    allowed: AppAllowList = AppAllowList()

    @property
    def runtime_api_address(self) -> str:
        """Where the worker reaches the SuperNode's Runtime API (same machine)."""
        return f"127.0.0.1:{self.port}"


def toml_value(value: str) -> str:
    """A node-config value in TOML syntax: numbers and booleans bare, the rest quoted."""
    if value in ("true", "false"):
        return value
    try:
        float(value)
    except ValueError:
        return json.dumps(value)
    return value


def build_node_config(
    data_path: Path | None,
    partition_id: int | None,
    num_partitions: int | None,
    extra: str = "",
) -> str:
    """The ``--node-config`` string for this node's data.

    Raises
    ------
    DeployError
        If neither (or an incomplete pair of) the data options is given.
    """
    parts: list[str] = []
    if partition_id is not None:
        parts.append(f"partition-id={partition_id}")
    if num_partitions is not None:
        parts.append(f"num-partitions={num_partitions}")
    if data_path is not None:
        parts.append(f"data-path={toml_value(str(data_path.expanduser().resolve()))}")
    elif (partition_id is None) != (num_partitions is None):
        raise DeployError("give both --partition-id and --num-partitions (or --data-path)")
    if extra.strip():
        parts.append(extra.strip())
    config = " ".join(parts)
    if not any(key in config for key in ("data-path", "partition-id")):
        raise DeployError(
            "say which data this node trains on: --data-path DIR (its own data, see "
            "client/local_data.py for the format) or --partition-id I --num-partitions N "
            "(a partition of the run's dataset)"
        )
    return config


def validate_app_policy(isolation: str, allowed: AppAllowList) -> None:
    """A node says which app builds it runs, and the warm worker is what enforces it.

    Raises
    ------
    DeployError
        Unless exactly one of ``--allow-app`` and ``--allow-any-app`` is given,
        or when an allow-list is given to Flower's own per-message processes.
    """
    if allowed.any_app and allowed.hashes:
        raise DeployError("give --allow-app FAB_HASH or --allow-any-app, not both")
    if not allowed.any_app and not allowed.hashes:
        raise DeployError(
            "say which app builds this node runs: --allow-app FAB_HASH (repeatable; "
            "python -m deploy app-hash APP_DIR prints the hash of the code you reviewed), "
            "or --allow-any-app to run whatever the SuperLink sends"
        )
    if isolation != "warm" and not allowed.any_app:
        raise DeployError(
            "--allow-app is enforced by the warm worker; with --isolation subprocess Flower "
            "runs every app build it is sent: drop --isolation subprocess, or give "
            "--allow-any-app instead"
        )


def check_node(settings: NodeSettings, data_path: Path | None) -> list[str]:
    """Run every check before Flower starts; return what was checked, for the log.

    Raises
    ------
    DeployError, ValueError
        The first problem found, with a message naming it and the fix.
    """
    done: list[str] = []
    if data_path is not None:
        arrays = read_local_arrays(data_path)
        shape = "x".join(map(str, arrays.x.shape[1:]))
        done.append(f"data {arrays.path}: {len(arrays.y)} examples of {shape}")
    if settings.auth_key is not None:
        load_node_private_key(settings.auth_key)
        done.append(f"node key {settings.auth_key}")
    if settings.ca_cert is None:
        check_superlink_insecure(settings.superlink, settings.connect_timeout_s)
        done.append(f"SuperLink {settings.superlink} reachable without TLS")
    else:
        names = check_superlink_tls(
            settings.superlink, settings.ca_cert, settings.connect_timeout_s
        )
        done.append(
            f"SuperLink {settings.superlink}: TLS verified (certificate for {', '.join(names)})"
        )
    return done


def flower_command(settings: NodeSettings) -> list[str]:
    """The command line of Flower's SuperNode for these settings."""
    command = [
        sys.executable,
        "-m",
        "deploy.flower_supernode",
        "--poll-interval",
        f"{settings.poll_interval_s:g}",
        "--heartbeat-interval",
        f"{settings.heartbeat_interval_s:g}",
        "--",
        "--superlink",
        settings.superlink,
        "--node-config",
        settings.node_config,
        "--port",
        str(settings.port),
        "--isolation",
        "process" if settings.isolation == "warm" else "subprocess",
    ]
    if settings.ca_cert is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(settings.ca_cert)]
    if settings.auth_key is not None:
        command += ["--auth-supernode-private-key", str(settings.auth_key)]
    return command + list(settings.extra_flower_args)


def worker_command(settings: NodeSettings, parent_pid: int) -> list[str]:
    """The warm ClientApp worker's command line; it exits when ``parent_pid`` does."""
    return [
        sys.executable,
        "-m",
        "deploy.worker",
        "--runtime-api-address",
        settings.runtime_api_address,
        "--parent-pid",
        str(parent_pid),
        *settings.allowed.arguments(),
    ]


def node_env(settings: NodeSettings) -> dict[str, str]:
    """Environment of the children: FLWR_HOME, the venv first on PATH, the chosen GPU."""
    env = flwr_env(settings.flwr_home)
    env["PYTHONUNBUFFERED"] = "1"
    # `python -m deploy.*` must find this project from any working directory.
    project = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [project, env.get("PYTHONPATH", "")]))
    if settings.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = settings.gpu
    if settings.cpu_threads is not None:
        # torch reads it at start: the worker's training uses this many threads.
        env["OMP_NUM_THREADS"] = str(settings.cpu_threads)
    return env


@dataclass
class OnlineMarker:
    """Remembers across restarts that this node was online, as the SuperLink may still think."""

    path: Path
    heartbeat_interval_s: float

    def rejoin_deadline(self) -> float | None:
        """Until when a refused activation is the old session, or None if there was none."""
        try:
            saved = json.loads(self.path.read_text())
            last_seen = self.path.stat().st_mtime
        except (OSError, ValueError):
            return None
        # The SuperLink keeps a silent node online for 2 heartbeat intervals.
        return last_seen + 2 * float(saved.get("heartbeat_interval_s", 30.0)) + 5.0

    def write(self, node_id: str) -> None:
        """Record that the node ``node_id`` is online now."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"node_id": node_id, "heartbeat_interval_s": self.heartbeat_interval_s}
        self.path.write_text(json.dumps(payload))

    def refresh(self) -> None:
        """Move the last-seen time to now."""
        if self.path.exists():
            os.utime(self.path)

    def clear(self) -> None:
        """The node left cleanly: the SuperLink has marked it offline."""
        self.path.unlink(missing_ok=True)


@dataclass
class NodeSupervisor:
    """Runs and watches the SuperNode and its worker until stopped."""

    settings: NodeSettings
    out: TextIO = field(default=sys.stdout)
    node: subprocess.Popen[str] | None = None
    worker: subprocess.Popen[bytes] | None = None
    node_id: str | None = None
    activation_refused: bool = False
    _stopping: threading.Event = field(default_factory=threading.Event)
    _worker_crashes: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.marker = OnlineMarker(
            self.settings.flwr_home / ONLINE_MARKER, self.settings.heartbeat_interval_s
        )

    def say(self, text: str) -> None:
        """One line from the supervisor itself."""
        print(f"[fedcoord-deploy] {text}", file=self.out, flush=True)

    # ------------------------------------------------------------- lifecycle
    def run(self) -> int:
        """Start, supervise and stop the node; return the exit code."""
        previous = {
            signum: signal.signal(signum, self._request_stop)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        rejoin_deadline = self.marker.rejoin_deadline()
        env = node_env(self.settings)
        try:
            # The worker outlives SuperNode restarts: it waits for the Runtime API.
            if self.settings.isolation == "warm":
                self._start_worker(env)
            while True:
                code = self._run_node_once(env)
                if self._stopping.is_set():
                    self.marker.clear()
                    return 0
                if not self.activation_refused:
                    return code
                if rejoin_deadline is None or time.time() > rejoin_deadline:
                    self._explain_refusal()
                    return EXIT_NOT_REGISTERED
                self.say(
                    "the SuperLink refused to activate this node: it still counts the previous "
                    "session of this node (stopped without leaving) as online for another "
                    f"{rejoin_deadline - time.time():.0f}s at most; retrying in {REJOIN_RETRY_S:g}s"
                )
                if self._stopping.wait(REJOIN_RETRY_S):
                    return 0
        finally:
            self._stop(self.node, self.worker)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _explain_refusal(self) -> None:
        key = self.settings.auth_key
        public = f"{key}.pub" if key is not None else "its public key"
        self.say(
            f"the SuperLink refused to activate this node: its key is not registered. On the "
            f"SuperLink machine run: python -m deploy register {public}  (then start this node "
            "again)"
        )

    def _run_node_once(self, env: dict[str, str]) -> int:
        """One life of Flower's SuperNode; return its exit code."""
        self.activation_refused = False
        self.node_id = None
        self.node = subprocess.Popen(
            flower_command(self.settings),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        reader = threading.Thread(target=self._relay, args=(self.node,), daemon=True)
        reader.start()
        last_refresh = 0.0
        while self.node.poll() is None and not self._stopping.is_set():
            if self.worker is not None and self.worker.poll() is not None:
                self._on_worker_exit(env)
            if self.node_id is not None and time.monotonic() - last_refresh > MARKER_REFRESH_S:
                self.marker.refresh()
                last_refresh = time.monotonic()
            time.sleep(0.2)
        self._stop(self.node)
        reader.join(timeout=5)
        return int(self.node.returncode or 0)

    def _start_worker(self, env: dict[str, str]) -> None:
        self.worker = subprocess.Popen(worker_command(self.settings, os.getpid()), env=env)

    def _on_worker_exit(self, env: dict[str, str]) -> None:
        """Restart a worker that died; give up when it keeps dying."""
        assert self.worker is not None
        now = time.monotonic()
        self._worker_crashes = [t for t in self._worker_crashes if now - t < 60] + [now]
        self.say(f"the ClientApp worker exited with code {self.worker.returncode}; restarting it")
        if len(self._worker_crashes) > WORKER_CRASH_LIMIT:
            self.say("the ClientApp worker keeps dying (see its log above); stopping this node")
            self._stopping.set()
            return
        self._start_worker(env)

    def _relay(self, node: subprocess.Popen[str]) -> None:
        """Echo the SuperNode's output and notice activation and refusal."""
        assert node.stdout is not None
        for line in node.stdout:
            self.out.write(line)
            self.out.flush()
            if NODE_ID_LINE in line:
                self.node_id = line.split(NODE_ID_LINE, 1)[1].strip()
                self.marker.write(self.node_id)
            elif ACTIVATION_REFUSED in line:
                self.activation_refused = True

    def _request_stop(self, signum: int, _frame: FrameType | None) -> None:
        self.say(f"{signal.Signals(signum).name}: stopping the SuperNode")
        self._stopping.set()

    @staticmethod
    def _stop(*children: subprocess.Popen[str] | subprocess.Popen[bytes] | None) -> None:
        """SIGTERM (the SuperNode then leaves the federation), SIGKILL after 10 s."""
        running = [child for child in children if child is not None]
        for child in running:
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 10.0
        for child in running:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def run_supernode(
    settings: NodeSettings,
    data_path: Path | None,
    check_only: bool = False,
    say: Callable[[str], None] | None = None,
) -> int:
    """Check, then (unless ``check_only``) run the node until it is stopped."""
    supervisor = NodeSupervisor(settings)
    report = say or supervisor.say
    for line in check_node(settings, data_path):
        report(f"ok: {line}")
    if check_only:
        return 0
    report(
        f"starting SuperNode (isolation {settings.isolation}, runtime API "
        f"{settings.runtime_api_address}, FLWR_HOME {settings.flwr_home}"
        + (f", CUDA_VISIBLE_DEVICES={settings.gpu}" if settings.gpu is not None else "")
        + f"); runs {settings.allowed.describe()}"
    )
    return supervisor.run()
