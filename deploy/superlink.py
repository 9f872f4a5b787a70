r"""Start the SuperLink: Flower on loopback, nginx on the public port, TLS and node auth.

``python -m deploy superlink`` checks the certificate pair (signed by the CA,
key matching, valid for loopback, which Flower's SuperExec and nginx use, and
for every ``--address`` nodes will use), then starts and watches two processes:

- Flower's SuperLink on 127.0.0.1 only (``--loopback-port``, default the public
  port + 1)::

    flower-superlink --ssl-certfile server.pem --ssl-keyfile server.key \
        --ssl-ca-certfile ca.crt --enable-supernode-auth --database STATE/state.db \
        --host 127.0.0.1 --port 8001 --disable-runtime-dependency-installation

- nginx on ``--host``:``--port`` (8000) with the same certificate, forwarding
  the Fleet API from anywhere and the Control API only from this machine and
  the ``--operator`` addresses (deploy/proxy.py).

SIGTERM or Ctrl-C stops both, by PID; if one of them exits, the other is
stopped too; if this process is killed outright, both get SIGTERM (Linux
parent-death signal). ``--no-proxy`` gives Flower's own setup back (one port, every API,
for everyone who reaches it): the process then becomes ``flower-superlink``.

The database keeps registered node keys and runs across restarts. Flower then
keeps message objects in it too, one SQLite transaction per object; fedcoord's
packed model records keep that to a few objects per message (BENCHMARKS.md).
``--in-memory`` drops the database (keys must be registered again after a
restart).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from deploy.checks import DeployError, check_local_certificates
from deploy.proxy import ProxySettings, check_config, nginx_command, require_nginx, write_config
from server.launch.processes import flwr_env

DEFAULT_PORT = 8000
DATABASE_FILE = "state.db"
PROXY_DIR = "proxy"
LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class SuperLinkSettings:
    """How to start the SuperLink; built from the command line.

    ``host`` / ``port`` are the public address (nginx's, or Flower's with
    ``proxy=False``); ``loopback_port`` is Flower's own port on 127.0.0.1.
    """

    certs_dir: Path | None
    state_dir: Path
    flwr_home: Path
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    addresses: tuple[str, ...] = ()
    node_auth: bool = True
    runtime_install: bool = False
    log_file: Path | None = None
    in_memory: bool = False
    proxy: bool = True
    loopback_port: int | None = None
    operators: tuple[str, ...] = ()

    @property
    def flower_host(self) -> str:
        """Where Flower's SuperLink listens."""
        return LOOPBACK if self.proxy else self.host

    @property
    def flower_port(self) -> int:
        """Flower's SuperLink port."""
        if not self.proxy:
            return self.port
        return self.loopback_port if self.loopback_port is not None else self.port + 1

    def proxy_settings(self) -> ProxySettings:
        """The proxy's settings: public address, Flower's loopback port, operators."""
        return ProxySettings(
            listen_host=self.host,
            listen_port=self.port,
            upstream_port=self.flower_port,
            runtime_dir=self.state_dir / PROXY_DIR,
            certs_dir=self.certs_dir,
            operators=self.operators,
        )


def check_superlink(settings: SuperLinkSettings) -> list[str]:
    """Check the settings and certificates before anything starts; return what was checked."""
    done = _check_ports(settings)
    if settings.certs_dir is None:
        if settings.node_auth:
            raise DeployError(
                "SuperNode authentication needs TLS: give --certs DIR (python -m deploy certs) "
                "or --no-node-auth with --insecure"
            )
        return [*done, "no TLS (--insecure): traffic and node identities are not protected"]
    paths = [settings.certs_dir / name for name in (CA_CERT, SERVER_CERT, SERVER_KEY)]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DeployError(
            f"missing {', '.join(missing)}; make them with: python -m deploy certs "
            f"--out {settings.certs_dir} --host <address nodes use>"
        )
    hosts = [LOOPBACK, "localhost", *settings.addresses]
    if settings.host not in ("0.0.0.0", "::", ""):
        hosts.append(settings.host)
    names = check_local_certificates(*paths, hosts=hosts)
    return [*done, f"TLS certificate {paths[1]} valid for {', '.join(names)}"]


def _check_ports(settings: SuperLinkSettings) -> list[str]:
    if not settings.proxy:
        if settings.operators:
            raise DeployError("--operator needs the proxy; drop --no-proxy or --operator")
        return [
            f"no proxy (--no-proxy): every address that reaches port {settings.port} can use "
            "the Control API (submit runs, register keys) and the Runtime API"
        ]
    if settings.flower_port == settings.port:
        raise DeployError(
            f"--loopback-port {settings.flower_port} is the public --port too; give another"
        )
    operators = ", ".join(settings.operators) or "none"
    return [
        f"public port {settings.host}:{settings.port} (nginx): Fleet API for nodes; Control "
        f"API for this machine and operators ({operators}); SuperLink on "
        f"{LOOPBACK}:{settings.flower_port}"
    ]


def superlink_command(settings: SuperLinkSettings) -> list[str]:
    """The ``flower-superlink`` command line for these settings."""
    command = [
        str(Path(sys.executable).with_name("flower-superlink")),
        "--host",
        settings.flower_host,
        "--port",
        str(settings.flower_port),
    ]
    if not settings.in_memory:
        command += ["--database", str(settings.state_dir.resolve() / DATABASE_FILE)]
    if settings.certs_dir is None:
        command.append("--insecure")
    else:
        certs = settings.certs_dir.resolve()
        command += [
            "--ssl-certfile",
            str(certs / SERVER_CERT),
            "--ssl-keyfile",
            str(certs / SERVER_KEY),
            "--ssl-ca-certfile",
            str(certs / CA_CERT),
        ]
    if settings.node_auth:
        command.append("--enable-supernode-auth")
    if not settings.runtime_install:
        command.append("--disable-runtime-dependency-installation")
    if settings.log_file is not None:
        command += ["--log-file", str(settings.log_file.resolve())]
    return command


def superlink_env(settings: SuperLinkSettings) -> dict[str, str]:
    """FLWR_HOME (the ServerApp's installed apps), the venv on PATH, no runtime installs."""
    env = flwr_env(settings.flwr_home)
    if settings.runtime_install:
        env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)
    return env


def exec_superlink(settings: SuperLinkSettings) -> None:
    """Replace this process with ``flower-superlink`` (``--no-proxy``; does not return)."""
    _make_dirs(settings)
    command = superlink_command(settings)
    sys.stdout.flush()
    os.execve(command[0], command, superlink_env(settings))


def _make_dirs(settings: SuperLinkSettings) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.flwr_home.mkdir(parents=True, exist_ok=True)


def wait_for_port(
    process: subprocess.Popen[bytes],
    address: tuple[str, int],
    stopping: threading.Event,
    timeout_s: float = READY_TIMEOUT_S,
) -> bool:
    """Until ``process`` accepts connections on ``address`` (uvicorn binds after its startup).

    Returns False when ``stopping`` is set first.

    Raises
    ------
    DeployError
        If ``process`` exits first or the port stays closed for ``timeout_s``.
    """
    name = Path(str(process.args[0])).name if isinstance(process.args, list) else "process"
    host, port = address
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                raise DeployError(
                    f"{name} did not open {host}:{port} within {timeout_s:.0f}s"
                ) from None
            if stopping.wait(0.1):
                return False
    raise DeployError(
        f"{name} exited with code {process.returncode} before it was ready (its log is above)"
    )


def validate_port_free(host: str, port: int, what: str) -> None:
    """Bind ``host:port`` once, so a port in use is one line before anything starts.

    Raises
    ------
    DeployError
        Naming the port and the option that moves it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise DeployError(
                f"{what} {host}:{port} is not free ({error.strerror or error}); stop what "
                "uses it (another SuperLink?) or choose another port"
            ) from error


def die_with_parent() -> None:
    """In a child, before exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def stop_child(process: subprocess.Popen[bytes] | None, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM one child by its PID; SIGKILL it after ``grace_s``."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class SuperLinkSupervisor:
    """Runs Flower's SuperLink (loopback) and nginx (public port) until stopped."""

    settings: SuperLinkSettings
    say: Callable[[str], None]
    flower: subprocess.Popen[bytes] | None = None
    nginx: subprocess.Popen[bytes] | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> int:
        """Check nginx's configuration, start both, watch them; return the exit code."""
        binary = require_nginx()
        validate_port_free(self.settings.host, self.settings.port, "the public --port")
        validate_port_free(LOOPBACK, self.settings.flower_port, "the --loopback-port")
        config = write_config(self.settings.proxy_settings())
        check_config(binary, config)
        _make_dirs(self.settings)
        previous = {
            signum: signal.signal(signum, self._request_stop)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self.flower = subprocess.Popen(
                superlink_command(self.settings),
                env=superlink_env(self.settings),
                preexec_fn=die_with_parent,  # noqa: PLW1509 - no threads run yet
            )
            flower_address = (LOOPBACK, self.settings.flower_port)
            if not wait_for_port(self.flower, flower_address, self._stopping):
                return 0
            self.nginx = subprocess.Popen(
                nginx_command(binary, config),
                preexec_fn=die_with_parent,  # noqa: PLW1509 - no threads run yet
            )
            if not wait_for_port(self.nginx, self._public_probe(), self._stopping):
                return 0
            self.say(
                f"ready: public port {self.settings.host}:{self.settings.port} (nginx pid "
                f"{self.nginx.pid}), SuperLink {LOOPBACK}:{self.settings.flower_port} "
                f"(pid {self.flower.pid}); refused requests go to {config.parent}/access.log"
            )
            return self._watch()
        finally:
            stop_child(self.nginx)
            stop_child(self.flower)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _public_probe(self) -> tuple[str, int]:
        """Where to connect to see nginx listening (loopback for a wildcard address)."""
        host = self.settings.host
        if host in ("0.0.0.0", ""):
            host = LOOPBACK
        elif host == "::":
            host = "::1"
        return host, self.settings.port

    def _watch(self) -> int:
        assert self.flower is not None and self.nginx is not None
        while not self._stopping.wait(0.2):
            for name, child in (("flower-superlink", self.flower), ("nginx", self.nginx)):
                if child.poll() is not None:
                    self.say(f"{name} exited with code {child.returncode}; stopping the other")
                    return 1
        return 0

    def _request_stop(self, signum: int, _frame: FrameType | None) -> None:
        self.say(f"{signal.Signals(signum).name}: stopping nginx and the SuperLink")
        self._stopping.set()
