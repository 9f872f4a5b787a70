"""A whole deployment on one machine: SuperLink and SuperNodes as separate processes.

For trying the deployment out, the integration tests and ``bench/deployment.py``.
It runs the same commands as the README's three-machine walk-through: TLS
certificates, node keys, a SuperLink with node authentication and a database
behind its nginx proxy, registered keys (through the proxy, from loopback), and
one ``python -m deploy supernode`` per node, allowing the app build of
``app_dir`` (and any other given).

With ``namespaces=True`` (root, iproute2) each SuperNode runs in a network
namespace of its own, joined to the host by a veth pair on a bridge, so nodes
and SuperLink talk over real, separate addresses (10.213.N.0/24, which exist
only on these interfaces); otherwise everything uses 127.0.0.1. With
``operator_namespace=True`` one more namespace plays an operator's machine, listed
with ``--operator``. Every process is stopped by its PID, and every namespace and
interface removed, on close.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deploy.apps import app_hash
from deploy.certs import create_certificates, create_node_keys
from deploy.checks import DeployError, check_superlink_tls
from deploy.connection import (
    DEFAULT_CONNECTION,
    flwr_executable,
    register_node,
    write_connection,
)
from server.launch.processes import descendants, flwr_env, free_port, stop_tree

PROJECT_DIR = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 180.0


def snapshot_app(source: Path, dest: Path) -> Path:
    """Copy the files of the app build ``flwr run SOURCE`` would send into ``dest``.

    The copy builds to the same FAB hash, and keeps it while ``source`` is edited.
    """
    from flwr.cli.build import build_fab_from_disk  # noqa: PLC0415 - imports typer, click

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(source))) as fab:
        for name in fab.namelist():
            if name.startswith(".info/"):
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(fab.read(name))
    return dest


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class NetworkNamespaces:
    """``count`` network namespaces on a bridge: the host is .1, namespace i is .(11+i)."""

    count: int
    tag: str = field(default_factory=lambda: str(os.getpid() % 100000))
    created_namespaces: list[str] = field(default_factory=list)
    bridge: str | None = None

    @property
    def subnet_prefix(self) -> str:
        """``10.213.K`` for a K of this process, so two test runs do not collide."""
        return f"10.213.{int(self.tag) % 200 + 20}"

    @property
    def host_address(self) -> str:
        """The host's (the SuperLink's) address on the bridge."""
        return f"{self.subnet_prefix}.1"

    def namespace(self, index: int) -> str:
        """The name of namespace ``index``."""
        return f"fcd{self.tag}n{index}"

    def node_address(self, index: int) -> str:
        """The address of namespace ``index``."""
        return f"{self.subnet_prefix}.{11 + index}"

    def create(self) -> None:
        """Create the bridge and the namespaces; on failure remove what was made and raise."""
        try:
            bridge = f"fcd{self.tag}b"
            _ip("link", "add", bridge, "type", "bridge")
            self.bridge = bridge
            _ip("addr", "add", f"{self.host_address}/24", "dev", bridge)
            _ip("link", "set", bridge, "up")
            for index in range(self.count):
                self._add_namespace(index)
        except (OSError, subprocess.SubprocessError) as error:
            self.remove()
            detail = getattr(error, "stderr", "") or str(error)
            raise DeployError(f"cannot create network namespaces: {detail.strip()}") from error

    def _add_namespace(self, index: int) -> None:
        name, host_end, node_end = self.namespace(index), f"fcd{self.tag}h{index}", "eth0"
        _ip("netns", "add", name)
        self.created_namespaces.append(name)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", f"fcd{self.tag}p{index}")
        _ip("link", "set", f"fcd{self.tag}p{index}", "netns", name)
        _ip("link", "set", host_end, "master", str(self.bridge))
        _ip("link", "set", host_end, "up")
        _ip("netns", "exec", name, "ip", "link", "set", f"fcd{self.tag}p{index}", "name", node_end)
        address = f"{self.node_address(index)}/24"
        _ip("netns", "exec", name, "ip", "addr", "add", address, "dev", node_end)
        _ip("netns", "exec", name, "ip", "link", "set", node_end, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")

    def remove(self) -> None:
        """Delete the namespaces (their veth pairs go with them) and the bridge."""
        for name in reversed(self.created_namespaces):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _ip("netns", "del", name)
        self.created_namespaces.clear()
        if self.bridge is not None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _ip("link", "del", self.bridge)
            self.bridge = None

    def prefix(self, index: int) -> list[str]:
        """Command prefix that runs a program inside namespace ``index``."""
        return ["ip", "netns", "exec", self.namespace(index)]


@dataclass
class NodeSpec:
    """One SuperNode of the cluster."""

    name: str
    data_args: list[str]
    port: int
    process: subprocess.Popen[bytes] | None = None
    log_file: Path | None = None


@dataclass
class LocalDeployment:
    """SuperLink + SuperNodes on this machine, managed by PID.

    Parameters
    ----------
    root : Path
        Folder for certificates, keys, state, logs and every FLWR_HOME.
    node_data : Sequence[list[str]]
        Per node, its data arguments for ``python -m deploy supernode``, e.g.
        ``["--partition-id", "0", "--num-partitions", "2"]`` or ``["--data-path", DIR]``.
    namespaces : bool
        Run each node in its own network namespace (falls back to loopback when
        namespaces cannot be created; ``namespace_error`` then says why).
    node_args : Sequence[str]
        Extra arguments for every ``python -m deploy supernode``; by default one
        training thread per node, since the nodes share this machine's cores.
    superlink_env : dict[str, str]
        Extra environment of the SuperLink (and the ServerApp processes it starts).
    superlink_args : Sequence[str]
        Extra arguments for ``python -m deploy superlink``.
    app_dir : Path
        The app ``flwr_run`` submits; the nodes allow its build.
    allowed_apps : Sequence[str] | None
        The FAB hashes the nodes allow; None: the build of ``app_dir``.
    proxy : bool
        The SuperLink behind nginx (the default of ``python -m deploy superlink``);
        False: ``--no-proxy``.
    operator_namespace : bool
        One more namespace, an operator's machine allowed to use the Control API.
    """

    root: Path
    node_data: Sequence[list[str]]
    namespaces: bool = False
    node_args: Sequence[str] = ("--cpu-threads", "1")
    superlink_env: dict[str, str] = field(default_factory=dict)
    superlink_args: Sequence[str] = ()
    app_dir: Path = PROJECT_DIR
    allowed_apps: Sequence[str] | None = None
    proxy: bool = True
    operator_namespace: bool = False
    port: int = field(default_factory=free_port)
    loopback_port: int = field(default_factory=free_port)
    network: NetworkNamespaces | None = None
    namespace_error: str | None = None
    superlink: subprocess.Popen[bytes] | None = None
    nodes: list[NodeSpec] = field(default_factory=list)
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # ------------------------------------------------------------- addresses
    @property
    def superlink_host(self) -> str:
        """The address nodes use for the SuperLink."""
        return self.network.host_address if self.network is not None else "127.0.0.1"

    @property
    def superlink_address(self) -> str:
        """``HOST:PORT`` of the SuperLink as the nodes see it (the public port)."""
        return f"{self.superlink_host}:{self.port}"

    @property
    def operator_index(self) -> int | None:
        """The namespace of the operator's machine, if there is one."""
        if self.network is None or not self.operator_namespace:
            return None
        return len(self.node_data)

    def in_namespace(self, index: int | None) -> list[str]:
        """Command prefix that runs a program in namespace ``index`` (nothing without one)."""
        return self.network.prefix(index) if self.network and index is not None else []

    @property
    def certs(self) -> Path:
        """Folder of ca.crt, server.pem, server.key."""
        return self.root / "certs"

    @property
    def keys(self) -> Path:
        """Folder of the node key pairs."""
        return self.root / "keys"

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of the ``flwr`` user (the connection lives here)."""
        return self.root / "flwr-cli"

    def env(self) -> dict[str, str]:
        """Environment for ``flwr`` commands against this deployment."""
        return flwr_env(self.flwr_home)

    # ----------------------------------------------------------------- start
    def start(self) -> None:
        """Certificates, keys, SuperLink, connection, registration, then every node."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.namespaces:
            network = NetworkNamespaces(len(self.node_data) + int(self.operator_namespace))
            try:
                network.create()
                self.network = network
            except DeployError as error:
                self.namespace_error = str(error)
        create_certificates(self.certs, [self.superlink_host])
        names = [f"node-{index + 1}" for index in range(len(self.node_data))]
        for name in names:
            create_node_keys(self.keys, name, force=True)
        if self.allowed_apps is None:
            self.allowed_apps = [app_hash(self.app_dir)]
        self.start_superlink()
        ca_cert = self.certs / "ca.crt"
        # On the SuperLink machine, through the public port from loopback.
        write_connection(self.flwr_home, DEFAULT_CONNECTION, f"127.0.0.1:{self.port}", ca_cert)
        for name in names:
            register_node(self.keys / f"{name}.pub", DEFAULT_CONNECTION, self.env())
        self.nodes = [
            NodeSpec(name, list(args), free_port())
            for name, args in zip(names, self.node_data, strict=True)
        ]
        for index in range(len(self.nodes)):
            self.start_node(index)
        self.wait_for_nodes(len(self.nodes))

    def _spawn(
        self, command: list[str], log_name: str, extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log_dir = self.root / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / log_name, "ab") as log:
            return subprocess.Popen(
                command,
                cwd=PROJECT_DIR,
                env={**flwr_env(self.root / "flwr-cli"), **(extra_env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def deploy_command(self, *args: str) -> list[str]:
        """``python -m deploy ARGS`` with this interpreter."""
        return [sys.executable, "-m", "deploy", *args]

    def superlink_command(self) -> list[str]:
        """``python -m deploy superlink`` for this deployment."""
        options: list[str] = []
        if not self.proxy:
            options.append("--no-proxy")
        operator = self.operator_index
        if operator is not None and self.network is not None:
            options += ["--operator", self.network.node_address(operator)]
        return self.deploy_command(
            "superlink",
            "--certs",
            str(self.certs),
            "--port",
            str(self.port),
            "--loopback-port",
            str(self.loopback_port),
            "--state-dir",
            str(self.root / "superlink-state"),
            "--flwr-home",
            str(self.root / "flwr-superlink"),
            "--address",
            self.superlink_host,
            *options,
            *self.superlink_args,
        )

    def start_superlink(self) -> None:
        """Start the SuperLink and wait until its public port answers TLS."""
        self.superlink = self._spawn(self.superlink_command(), "superlink.log", self.superlink_env)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.superlink.poll() is not None:
                raise DeployError(f"the SuperLink exited; see {self.root / 'logs/superlink.log'}")
            try:
                check_superlink_tls(f"127.0.0.1:{self.port}", self.certs / "ca.crt", 2.0)
                return
            except DeployError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def app_arguments(self) -> list[str]:
        """``--allow-app`` for every allowed build, unless the nodes allow any app."""
        if "--allow-any-app" in self.node_args:
            return []
        return [arg for digest in self.allowed_apps or () for arg in ("--allow-app", digest)]

    def node_command(self, index: int, *extra: str) -> list[str]:
        """The command that starts node ``index`` (inside its namespace, if any)."""
        node = self.nodes[index]
        command = self.deploy_command(
            "supernode",
            "--superlink",
            self.superlink_address,
            "--ca",
            str(self.certs / "ca.crt"),
            "--key",
            str(self.keys / node.name),
            "--port",
            str(node.port),
            "--flwr-home",
            str(self.root / f"flwr-{node.name}"),
            *node.data_args,
            *self.app_arguments(),
            *self.node_args,
            *extra,
        )
        return self.in_namespace(index) + command

    def start_node(self, index: int) -> subprocess.Popen[bytes]:
        """Start (or restart) node ``index``."""
        node = self.nodes[index]
        node.log_file = self.root / "logs" / f"{node.name}.log"
        node.process = self._spawn(self.node_command(index), f"{node.name}.log")
        return node.process

    def kill_node(self, index: int) -> None:
        """SIGKILL node ``index`` and everything it started, as a machine crash would."""
        process = self.nodes[index].process
        if process is None:
            return
        for pid in [process.pid, *descendants(process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        process.wait(timeout=30)

    def online_nodes(self) -> list[str]:
        """Node ids the SuperLink lists as online."""
        result = subprocess.run(
            [flwr_executable(), "supernode", "list", DEFAULT_CONNECTION, "--format", "json"],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        try:
            listed = json.loads(result.stdout)["nodes"]
        except (ValueError, KeyError):
            return []
        return [str(node["node-id"]) for node in listed if node.get("status") == "online"]

    def wait_for_nodes(self, count: int, timeout_s: float = READY_TIMEOUT_S) -> list[str]:
        """Wait until ``count`` nodes are online; raise with the logs' location otherwise."""
        deadline = time.monotonic() + timeout_s
        online: list[str] = []
        while time.monotonic() < deadline:
            online = self.online_nodes()
            if len(online) >= count:
                return online
            time.sleep(1.0)
        raise DeployError(
            f"only {len(online)} of {count} SuperNodes online after {timeout_s:.0f}s; "
            f"see {self.root / 'logs'}"
        )

    # ------------------------------------------------------------------ runs
    def flwr_run(
        self,
        run_config: str,
        stream: bool = True,
        app_dir: Path | None = None,
        timeout_s: float = 900,
    ) -> subprocess.CompletedProcess[str]:
        """``flwr run APP fedcoord --run-config ...`` from this machine (``app_dir``)."""
        app_dir = app_dir or self.app_dir
        command = [flwr_executable(), "run", str(app_dir), DEFAULT_CONNECTION]
        if run_config:
            command += ["--run-config", run_config]
        if stream:
            command.append("--stream")
        return subprocess.run(
            command,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=app_dir,
            check=False,
        )

    # ----------------------------------------------------------------- close
    def close(self) -> None:
        """Stop every node and the SuperLink by PID, then remove the namespaces."""
        try:
            for node in self.nodes:
                if node.process is not None:
                    stop_tree(node.process, grace_s=15.0)
            for process in self.others:
                stop_tree(process, grace_s=10.0)
            if self.superlink is not None:
                stop_tree(self.superlink, grace_s=10.0)
        finally:
            if self.network is not None:
                self.network.remove()

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
