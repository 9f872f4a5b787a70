r"""Start the SuperLink: TLS, SuperNode authentication and a persistent database.

``python -m deploy superlink`` checks the certificate pair (signed by the CA,
key matching, valid for loopback, which Flower's SuperExec uses to start the
ServerApp, and for every ``--address`` nodes will use), then replaces itself
with ``flower-superlink`` (same PID, so it is stopped like the SuperLink itself)::

    flower-superlink --ssl-certfile server.pem --ssl-keyfile server.key \
        --ssl-ca-certfile ca.crt --enable-supernode-auth --database STATE/state.db \
        --host 0.0.0.0 --port 8000 --disable-runtime-dependency-installation

The database keeps registered node keys and runs across restarts. Flower then
keeps message objects in it too, one SQLite transaction per object; fedcoord's
packed model records keep that to a few objects per message (BENCHMARKS.md).
``--in-memory`` drops the database (keys must be registered again after a
restart).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from deploy.checks import DeployError, check_local_certificates
from server.simulation import flwr_env

DEFAULT_PORT = 8000
DATABASE_FILE = "state.db"


@dataclass(frozen=True)
class SuperLinkSettings:
    """How to start the SuperLink; built from the command line."""

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


def check_superlink(settings: SuperLinkSettings) -> list[str]:
    """Check the certificates before Flower starts; return what was checked."""
    if settings.certs_dir is None:
        if settings.node_auth:
            raise DeployError(
                "SuperNode authentication needs TLS: give --certs DIR (python -m deploy certs) "
                "or --no-node-auth with --insecure"
            )
        return ["no TLS (--insecure): traffic and node identities are not protected"]
    paths = [settings.certs_dir / name for name in (CA_CERT, SERVER_CERT, SERVER_KEY)]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DeployError(
            f"missing {', '.join(missing)}; make them with: python -m deploy certs "
            f"--out {settings.certs_dir} --host <address nodes use>"
        )
    hosts = ["127.0.0.1", *settings.addresses]
    if settings.host not in ("0.0.0.0", "::", ""):
        hosts.append(settings.host)
    names = check_local_certificates(*paths, hosts=hosts)
    return [f"TLS certificate {paths[1]} valid for {', '.join(names)}"]


def superlink_command(settings: SuperLinkSettings) -> list[str]:
    """The ``flower-superlink`` command line for these settings."""
    command = [
        str(Path(sys.executable).with_name("flower-superlink")),
        "--host",
        settings.host,
        "--port",
        str(settings.port),
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
    """Replace this process with ``flower-superlink`` (does not return)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.flwr_home.mkdir(parents=True, exist_ok=True)
    command = superlink_command(settings)
    sys.stdout.flush()
    os.execve(command[0], command, superlink_env(settings))
