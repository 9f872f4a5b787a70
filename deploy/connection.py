"""The ``flwr`` side: a named SuperLink connection in FLWR_HOME/config.toml, node registration.

``flwr run . NAME``, ``flwr supernode register KEY NAME``, ``flwr ls NAME`` and
``flwr stop RUN NAME`` all read the connection ``NAME`` from
``$FLWR_HOME/config.toml`` (``~/.flwr`` by default)::

    [superlink]
    default = "fedcoord"

    [superlink.fedcoord]
    address = "10.0.0.5:8000"
    root-certificates = "/abs/path/ca.crt"
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w

from deploy.checks import DeployError, parse_address

CONFIG_FILE = "config.toml"
DEFAULT_CONNECTION = "fedcoord"


def default_flwr_home() -> Path:
    """Flower's default FLWR_HOME."""
    return Path.home() / ".flwr"


def write_connection(
    flwr_home: Path,
    name: str,
    address: str,
    ca_cert: Path | None,
    make_default: bool = True,
) -> Path:
    """Add or replace connection ``name``; other connections in the file are kept.

    ``ca_cert=None`` writes an insecure (plain HTTP) connection.
    """
    parse_address(address)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / CONFIG_FILE
    try:
        config = tomllib.loads(path.read_text()) if path.is_file() else {}
    except tomllib.TOMLDecodeError as error:
        raise DeployError(f"{path} is not valid TOML ({error}); fix or remove it") from error
    superlink = config.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address}
    if ca_cert is None:
        entry["insecure"] = True
    else:
        if not ca_cert.is_file():
            raise DeployError(f"CA certificate {ca_cert} does not exist")
        entry["root-certificates"] = str(ca_cert.resolve())
    superlink[name] = entry
    if make_default or "default" not in superlink:
        superlink["default"] = name
    path.write_text(tomli_w.dumps(config))
    return path


def flwr_executable(name: str = "flwr") -> str:
    """A Flower console script from the running interpreter's environment."""
    return str(Path(sys.executable).with_name(name))


def register_node(
    public_key: Path, connection: str, env: dict[str, str], timeout_s: float = 60.0
) -> str:
    """Register a SuperNode public key on the SuperLink; idempotent.

    Returns
    -------
    str
        What happened, for the user: the node id, or that it was registered before.

    Raises
    ------
    DeployError
        If ``flwr supernode register`` fails for another reason.
    """
    if not public_key.is_file():
        raise DeployError(f"public key {public_key} does not exist")
    result = subprocess.run(
        [flwr_executable(), "supernode", "register", str(public_key), connection],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode == 0:
        lines = [line for line in output.splitlines() if "registered" in line]
        return lines[-1].strip() if lines else f"{public_key.name} registered"
    if "already in use" in output:
        return f"{public_key.name} was already registered"
    raise DeployError(
        f"flwr supernode register {public_key} {connection} failed "
        f"(exit {result.returncode}):\n{output.strip()}"
    )
