r"""The SuperLink's public port: nginx in front of Flower, so nodes reach only the Fleet API.

Flower 1.42's SuperLink serves three HTTP APIs on one port (uvicorn, HTTP/1.1,
protobuf bodies in POST requests): the Fleet API (``/v1/fleet/...``, SuperNodes,
each request signed with the node's registered key), the Control API
(``/v1/control/...``: ``flwr run``, ``flwr supernode register``, ``flwr stop``;
no accounts in the open-source SuperLink) and the Runtime API
(``/v1/runtime/...``, the ServerApp processes on the SuperLink machine; not
authenticated under the default subprocess isolation). ``--control-api-address``
is deprecated and ignored, so Flower alone cannot keep the Control API from the
nodes.

``python -m deploy superlink`` therefore starts Flower's SuperLink on 127.0.0.1
only and nginx on the public address, with this allow-list:

- ``POST /v1/fleet/NAME``: from anywhere (Flower authenticates the node);
- ``POST /v1/control/NAME``: from 127.0.0.1 / ::1 (the SuperLink machine) and
  the addresses given with ``--operator``; 403 for every other address;
- everything else (the Runtime API, ``/docs``, ``/health``, ``/``, other
  methods, encoded or dot-segment paths): 403, never forwarded.

TLS ends at nginx with the SuperLink's certificate (the one nodes verify with
``ca.crt``); nginx reaches Flower over TLS on loopback and verifies it with the
same CA. Refused requests are written to ``PROXY_DIR/access.log``.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from deploy.checks import DeployError

NGINX_PACKAGE = "nginx"
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
CONFIG_FILE = "nginx.conf"
ACCESS_LOG = "access.log"
LOOPBACK_CLIENTS = ("127.0.0.1", "::1")
# Flower's own gRPC limit; a protobuf message cannot be larger.
MAX_BODY = "2g"
# `flwr run --stream` and `flwr log` keep one Control API response open for the run.
CONTROL_STREAM_TIMEOUT = "24h"
REFUSAL = (
    "refused by the SuperLink's proxy: SuperNodes reach only the Fleet API (/v1/fleet/); "
    "the Control API answers on the SuperLink machine (127.0.0.1) and to the addresses "
    "given with python -m deploy superlink --operator ADDRESS"
)


@dataclass(frozen=True)
class ProxySettings:
    """Where nginx listens, where Flower's SuperLink is, and who may use the Control API.

    ``certs_dir`` None means plain HTTP on both sides (``--insecure``).
    ``operators`` are IP addresses or networks, already validated.
    """

    listen_host: str
    listen_port: int
    upstream_port: int
    runtime_dir: Path
    certs_dir: Path | None
    operators: tuple[str, ...] = ()


def parse_operator(text: str) -> str:
    """An ``--operator`` value as nginx writes it: an IP address or a network.

    Raises
    ------
    DeployError
        For a name, a malformed address, or a network that would let any
        address command the federation.
    """
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as error:
        raise DeployError(
            f"--operator {text!r} is not an IP address or network (e.g. 10.0.0.7, "
            "10.0.0.0/24, 2001:db8::7): give the address the operator's flwr connects from"
        ) from error
    if network.prefixlen == 0:
        raise DeployError(
            f"--operator {text!r} would let every address submit runs and register keys; "
            "list the operators' own addresses or networks"
        )
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def find_nginx() -> Path | None:
    """The nginx binary: on PATH, or where Debian installs it (/usr/sbin is not on every PATH)."""
    found = shutil.which("nginx")
    if found:
        return Path(found)
    return next((Path(path) for path in NGINX_CANDIDATES if Path(path).is_file()), None)


def require_nginx() -> Path:
    """The nginx binary, or a one-line error naming the package and the alternative."""
    binary = find_nginx()
    if binary is None:
        raise DeployError(
            f"the SuperLink's public port is served by nginx, which is not installed: "
            f"apt-get install {NGINX_PACKAGE} (or --no-proxy to expose Flower's port itself, "
            "Control API included, to every address that reaches it)"
        )
    return binary


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _path_guard(prefix: str) -> str:
    """Only ``PREFIX/name`` as sent, and only POST: no encodings, dot segments or queries."""
    return (
        f'            if ($request_uri !~ "^{prefix}[a-z][a-z-]*$") {{ return 403; }}\n'
        "            limit_except POST { deny all; }\n"
    )


def _upstream_tls(settings: ProxySettings) -> str:
    if settings.certs_dir is None:
        return ""
    ca = settings.certs_dir.resolve() / CA_CERT
    # nginx checks DNS names only; the SuperLink certificate names localhost.
    return (
        "    proxy_ssl_verify on;\n"
        f"    proxy_ssl_trusted_certificate {ca};\n"
        "    proxy_ssl_name localhost;\n"
        "    proxy_ssl_session_reuse on;\n"
    )


def _server_tls(settings: ProxySettings) -> str:
    if settings.certs_dir is None:
        return ""
    certs = settings.certs_dir.resolve()
    return (
        f"        ssl_certificate {certs / SERVER_CERT};\n"
        f"        ssl_certificate_key {certs / SERVER_KEY};\n"
        "        ssl_protocols TLSv1.2 TLSv1.3;\n"
    )


def nginx_config(settings: ProxySettings) -> str:
    """The whole nginx configuration for these settings (a pure function of them)."""
    run = settings.runtime_dir.resolve()
    tls = settings.certs_dir is not None
    scheme = "https" if tls else "http"
    allowed = "".join(
        f"            allow {client};\n" for client in (*LOOPBACK_CLIENTS, *settings.operators)
    )
    temp = "".join(
        f"    {kind}_temp_path {run / 'tmp' / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        "# Written by python -m deploy superlink at every start; edits are lost.\n"
        "worker_processes 1;\n"
        f"pid {run / 'nginx.pid'};\n"
        "error_log stderr warn;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        "    server_tokens off;\n"
        "    access_log off;\n"
        "    map $status $fedcoord_refused { ~^[23] 0; default 1; }\n"
        f"{temp}"
        f"    client_max_body_size {MAX_BODY};\n"
        "    proxy_http_version 1.1;\n"
        '    proxy_set_header Connection "";\n'
        "    proxy_set_header X-Forwarded-For $remote_addr;\n"
        "    proxy_request_buffering off;\n"
        "    proxy_buffering off;\n"
        f"{_upstream_tls(settings)}"
        "    upstream flower_superlink {\n"
        f"        server 127.0.0.1:{settings.upstream_port};\n"
        "        keepalive 16;\n"
        "    }\n"
        "    server {\n"
        f"        listen {_listen(settings.listen_host, settings.listen_port)}"
        f"{' ssl' if tls else ''};\n"
        f"{_server_tls(settings)}"
        f"        access_log {run / ACCESS_LOG} combined if=$fedcoord_refused;\n"
        "        error_page 403 @refused;\n"
        "        location @refused {\n"
        "            default_type text/plain;\n"
        f'            return 403 "{REFUSAL}\\n";\n'
        "        }\n"
        "        # Fleet API: SuperNodes, each request signed with its registered key.\n"
        "        location /v1/fleet/ {\n"
        f"{_path_guard('/v1/fleet/')}"
        f"            proxy_pass {scheme}://flower_superlink;\n"
        "        }\n"
        "        # Control API: this machine and the listed operators only.\n"
        "        location /v1/control/ {\n"
        f"{allowed}"
        "            deny all;\n"
        f"{_path_guard('/v1/control/')}"
        f"            proxy_read_timeout {CONTROL_STREAM_TIMEOUT};\n"
        f"            proxy_pass {scheme}://flower_superlink;\n"
        "        }\n"
        "        # The Runtime API, /docs, /health and anything else: never forwarded.\n"
        "        location / { return 403; }\n"
        "    }\n"
        "}\n"
    )


def write_config(settings: ProxySettings) -> Path:
    """Write the configuration (and the folders nginx needs); return its path."""
    run = settings.runtime_dir.resolve()
    (run / "tmp").mkdir(parents=True, exist_ok=True)
    path = run / CONFIG_FILE
    path.write_text(nginx_config(settings))
    return path


def nginx_command(binary: Path, config: Path, *extra: str) -> list[str]:
    """The command that runs nginx in the foreground (PID: the master), logging to stderr."""
    return [
        str(binary),
        "-p",
        str(config.parent),
        "-c",
        str(config),
        "-e",
        "stderr",
        "-g",
        "daemon off;",
        *extra,
    ]


def check_config(binary: Path, config: Path) -> None:
    """``nginx -t``: the configuration loads (certificates readable, port free to bind)."""
    result = subprocess.run(
        nginx_command(binary, config, "-t", "-q"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit code {result.returncode}"
        raise DeployError(f"nginx refuses its configuration {config}: {detail}")
