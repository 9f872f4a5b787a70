r"""``python -m deploy``: certificates, keys, SuperLink, node registration, SuperNodes, connection.

One SuperLink machine and N SuperNode machines, in order (README, "Run on
several machines")::

    python -m deploy certs --out certs --host 10.0.0.5           # SuperLink machine
    python -m deploy keys node-1 node-2 --out keys                # or on each node
    python -m deploy superlink --certs certs --state-dir state    # SuperLink machine
    python -m deploy connection --address 127.0.0.1:8000 --ca certs/ca.crt
    python -m deploy register keys/node-1.pub keys/node-2.pub     # SuperLink machine
    python -m deploy app-hash .                                   # each node, on the code
    python -m deploy supernode --superlink 10.0.0.5:8000 --ca ca.crt \
        --key keys/node-1 --partition-id 0 --num-partitions 2 \
        --allow-app FAB_HASH                                      # each node
    flwr run . fedcoord --run-config "num-server-rounds=10"       # SuperLink machine
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deploy.apps import AppAllowList, app_hash, parse_app_hash
from deploy.certs import CertificateError, create_certificates, create_node_keys
from deploy.checks import DEFAULT_CONNECT_TIMEOUT_S, DeployError, check_superlink_tls
from deploy.connection import (
    DEFAULT_CONNECTION,
    default_flwr_home,
    register_node,
    write_connection,
)
from deploy.proxy import parse_operator
from deploy.superlink import (
    DEFAULT_PORT,
    SuperLinkSettings,
    SuperLinkSupervisor,
    check_superlink,
    exec_superlink,
)
from deploy.supernode import (
    DEFAULT_NODE_POLL_S,
    NodeSettings,
    build_node_config,
    run_supernode,
    validate_app_policy,
)
from server.launch.processes import flwr_env
from task.config import ConfigError

PROG = "python -m deploy"


def say(text: str) -> None:
    """A line of output for the user."""
    print(text, flush=True)


# ------------------------------------------------------------------ commands
def cmd_certs(args: argparse.Namespace) -> int:
    """Make (or reuse) the CA and a SuperLink certificate for the given addresses."""
    paths = create_certificates(Path(args.out), args.host, force=args.new_ca)
    say(f"CA certificate     {paths.ca_cert}   (copy to every node and to flwr users)")
    say(f"CA key             {paths.ca_key}   (keep on this machine only)")
    say(f"SuperLink cert     {paths.server_cert}   (valid for {', '.join(args.host)} + loopback)")
    say(f"SuperLink key      {paths.server_key}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Make one EC key pair per node name."""
    for name in args.names:
        paths = create_node_keys(Path(args.out), name, force=args.force)
        say(f"{name}: private {paths.private_key} (stays on the node), public {paths.public_key}")
    return 0


def cmd_superlink(args: argparse.Namespace) -> int:
    """Check, then run the SuperLink behind nginx (or become ``flower-superlink``)."""
    settings = SuperLinkSettings(
        certs_dir=None if args.insecure else Path(args.certs),
        state_dir=Path(args.state_dir),
        flwr_home=Path(args.flwr_home or default_flwr_home()).expanduser().resolve(),
        host=args.host,
        port=args.port,
        addresses=tuple(args.address),
        node_auth=not args.no_node_auth,
        runtime_install=args.allow_runtime_install,
        log_file=Path(args.log_file) if args.log_file else None,
        in_memory=args.in_memory,
        proxy=not args.no_proxy,
        loopback_port=args.loopback_port,
        operators=tuple(parse_operator(text) for text in args.operator),
    )
    for line in check_superlink(settings):
        say(f"ok: {line}")
    if args.check_only:
        return 0
    if settings.proxy:
        return SuperLinkSupervisor(settings, say).run()
    say(f"starting flower-superlink on {settings.host}:{settings.port}")
    exec_superlink(settings)
    return 0  # not reached


def cmd_app_hash(args: argparse.Namespace) -> int:
    """Print the FAB hash of an app folder, for --allow-app."""
    say(app_hash(Path(args.app_dir)))
    return 0


def cmd_connection(args: argparse.Namespace) -> int:
    """Write the flwr connection and check that it reaches the SuperLink."""
    ca = None if args.insecure else Path(args.ca).expanduser()
    if ca is not None and not args.no_check:
        names = check_superlink_tls(args.address, ca, args.timeout)
        say(f"ok: SuperLink {args.address} verified (certificate for {', '.join(names)})")
    flwr_home = Path(args.flwr_home or default_flwr_home()).expanduser().resolve()
    path = write_connection(flwr_home, args.name, args.address, ca, not args.no_default)
    say(f"wrote connection {args.name!r} to {path}; use: flwr run . {args.name}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """Register node public keys on the SuperLink (idempotent)."""
    flwr_home = Path(args.flwr_home or default_flwr_home()).expanduser().resolve()
    env = flwr_env(flwr_home)
    for key in args.public_keys:
        say(register_node(Path(key), args.connection, env))
    return 0


def _node_settings(args: argparse.Namespace) -> tuple[NodeSettings, Path | None]:
    data_path = Path(args.data_path).expanduser().resolve() if args.data_path else None
    settings = NodeSettings(
        superlink=args.superlink,
        ca_cert=None if args.insecure else Path(args.ca).expanduser().resolve(),
        auth_key=Path(args.key).expanduser().resolve() if args.key else None,
        node_config=build_node_config(
            data_path, args.partition_id, args.num_partitions, args.node_config
        ),
        port=args.port,
        flwr_home=Path(args.flwr_home or default_flwr_home()).expanduser().resolve(),
        isolation=args.isolation,
        poll_interval_s=args.poll_interval,
        heartbeat_interval_s=args.heartbeat_interval,
        gpu=args.gpu,
        cpu_threads=args.cpu_threads,
        connect_timeout_s=args.timeout,
        allowed=AppAllowList(
            frozenset(parse_app_hash(text) for text in args.allow_app), args.allow_any_app
        ),
    )
    if settings.auth_key is None and not args.no_auth:
        raise DeployError(
            "give this node's private key (--key keys/NAME), or --no-auth for a SuperLink "
            "without node authentication"
        )
    return settings, data_path


def cmd_supernode(args: argparse.Namespace) -> int:
    """Check, then run one SuperNode with its warm ClientApp worker."""
    settings, data_path = _node_settings(args)
    validate_app_policy(settings.isolation, settings.allowed)
    return run_supernode(settings, data_path, check_only=args.check_only)


def cmd_check(args: argparse.Namespace) -> int:
    """The SuperNode's checks only."""
    settings, data_path = _node_settings(args)
    return run_supernode(settings, data_path, check_only=True, say=say)


# -------------------------------------------------------------------- parser
def _add_flwr_home(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flwr-home", help="Flower's home folder (default: $FLWR_HOME or ~/.flwr)")


def _add_node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--ca", help="the CA certificate that signed the SuperLink's (ca.crt)")
    tls.add_argument("--insecure", action="store_true", help="no TLS (testing only)")
    parser.add_argument("--key", help="this node's private key (python -m deploy keys)")
    parser.add_argument("--no-auth", action="store_true", help="SuperLink without node auth")
    data = parser.add_argument_group("this node's data (one of)")
    data.add_argument("--data-path", help="a folder with data.npz (x, y): the node's own data")
    data.add_argument("--partition-id", type=int, help="partition of the run's dataset")
    data.add_argument("--num-partitions", type=int, help="number of partitions")
    parser.add_argument("--node-config", default="", help='more node config, "k=v k2=v2"')
    apps = parser.add_argument_group("app builds this node runs (one of)")
    apps.add_argument(
        "--allow-app",
        action="append",
        default=[],
        metavar="FAB_HASH",
        help="an app build this node runs (repeatable); python -m deploy app-hash APP_DIR",
    )
    apps.add_argument(
        "--allow-any-app",
        action="store_true",
        help="run every app build the SuperLink sends (whoever submits runs runs code here)",
    )
    parser.add_argument(
        "--port", type=int, default=9094, help="this node's Runtime API port (one per node)"
    )
    parser.add_argument("--gpu", help="sets CUDA_VISIBLE_DEVICES for the ClientApp, e.g. 0")
    parser.add_argument(
        "--cpu-threads", type=int, help="CPU threads for training (OMP_NUM_THREADS); default: all"
    )
    parser.add_argument(
        "--isolation",
        choices=("warm", "subprocess"),
        default="warm",
        help="warm: one long-lived ClientApp process (default); subprocess: Flower's "
        "default, a new flwr-clientapp per message",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=DEFAULT_NODE_POLL_S,
        help="seconds between the node's pulls when idle (Flower: 3)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=30.0,
        help="node heartbeat seconds, 10-1800; a silent node is dropped after 2x this",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT_S,
        help="seconds to wait for the SuperLink in the checks",
    )
    _add_flwr_home(parser)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m deploy``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="See README.md, 'Run on several machines'.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    certs = sub.add_parser("certs", help="CA and SuperLink TLS certificate")
    certs.add_argument("--out", default="certs", help="output folder (default: certs)")
    certs.add_argument(
        "--host",
        action="append",
        required=True,
        help="an address nodes and flwr use for the SuperLink (repeat for several)",
    )
    certs.add_argument("--new-ca", action="store_true", help="replace an existing CA too")
    certs.set_defaults(func=cmd_certs)

    keys = sub.add_parser("keys", help="SuperNode key pairs")
    keys.add_argument("names", nargs="+", help="node names, e.g. node-1 node-2")
    keys.add_argument("--out", default="keys", help="output folder (default: keys)")
    keys.add_argument("--force", action="store_true", help="replace existing keys")
    keys.set_defaults(func=cmd_keys)

    link = sub.add_parser("superlink", help="start the SuperLink (TLS, node auth, database)")
    link.add_argument("--certs", default="certs", help="folder of ca.crt, server.pem, server.key")
    link.add_argument("--insecure", action="store_true", help="no TLS (implies --no-node-auth)")
    link.add_argument("--host", default="0.0.0.0", help="public listen address (default: all)")
    link.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="the public port nodes and flwr use"
    )
    link.add_argument(
        "--loopback-port",
        type=int,
        help="Flower's own SuperLink port, on 127.0.0.1 only (default: --port + 1)",
    )
    link.add_argument(
        "--operator",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="an IP address or network that may use the Control API (flwr run, register) "
        "through the public port, besides this machine (repeatable)",
    )
    link.add_argument(
        "--no-proxy",
        action="store_true",
        help="no nginx: Flower's port itself on --host, every API open to whoever reaches it",
    )
    link.add_argument("--state-dir", default="superlink-state", help="holds state.db")
    link.add_argument(
        "--in-memory",
        action="store_true",
        help="no database: faster transfers, but keys and runs are lost on restart",
    )
    link.add_argument(
        "--address",
        action="append",
        default=[],
        help="an address nodes use; checked against the certificate (repeatable)",
    )
    link.add_argument("--no-node-auth", action="store_true", help="accept any SuperNode")
    link.add_argument(
        "--allow-runtime-install",
        action="store_true",
        help="let Flower `uv sync` each app's dependencies (downloads)",
    )
    link.add_argument("--log-file", help="also write the SuperLink's log here")
    link.add_argument("--check-only", action="store_true", help="check, do not start")
    _add_flwr_home(link)
    link.set_defaults(func=cmd_superlink)

    connection = sub.add_parser("connection", help="write the flwr connection (config.toml)")
    connection.add_argument("--address", required=True, help="the SuperLink's HOST:PORT")
    tls = connection.add_mutually_exclusive_group(required=True)
    tls.add_argument("--ca", help="the CA certificate (ca.crt)")
    tls.add_argument("--insecure", action="store_true", help="no TLS")
    connection.add_argument("--name", default=DEFAULT_CONNECTION, help="connection name")
    connection.add_argument("--no-default", action="store_true", help="do not make it default")
    connection.add_argument("--no-check", action="store_true", help="do not connect to check")
    connection.add_argument("--timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT_S)
    _add_flwr_home(connection)
    connection.set_defaults(func=cmd_connection)

    register = sub.add_parser("register", help="register SuperNode public keys")
    register.add_argument("public_keys", nargs="+", help="keys/NAME.pub files")
    register.add_argument("--connection", default=DEFAULT_CONNECTION, help="flwr connection")
    _add_flwr_home(register)
    register.set_defaults(func=cmd_register)

    hash_parser = sub.add_parser("app-hash", help="the FAB hash of an app, for --allow-app")
    hash_parser.add_argument("app_dir", nargs="?", default=".", help="the app folder (default: .)")
    hash_parser.set_defaults(func=cmd_app_hash)

    node = sub.add_parser("supernode", help="check, then start a SuperNode")
    _add_node_arguments(node)
    node.add_argument("--check-only", action="store_true", help="check, do not start")
    node.set_defaults(func=cmd_supernode)

    check = sub.add_parser("check", help="a SuperNode's checks only")
    _add_node_arguments(check)
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user-fixable problems exit 2 with one clear line."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (DeployError, CertificateError, ConfigError) as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
