"""The options of the launch verbs: ``fedcoord run`` and ``fedcoord connection``.

``python -m server.launch.simulation`` takes ``fedcoord run``'s options.

Kept apart from the launcher so that the ``fedcoord`` command line builds its
parser without importing Flower; the launcher reads the options declared here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# fedcoord's own Flower app: the folder of its pyproject.toml.
APP_DIR = Path(__file__).resolve().parents[2]
DEFAULT_FLWR_HOME = ".flwr_home"
# ``fedcoord connection``'s default name: not deploy's "fedcoord", nor Flower's "local".
DEFAULT_CONNECTION_NAME = "fedcoord-local"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of a simulation run on ``parser``."""
    parser.add_argument(
        "--supernodes", type=int, default=10, metavar="N", help="simulated nodes (default: 10)"
    )
    parser.add_argument(
        "--num-cpus",
        type=float,
        default=1.0,
        metavar="C",
        help="CPUs per simulated node (default: 1)",
    )
    parser.add_argument(
        "--num-gpus",
        default="auto",
        metavar="G|auto",
        help="GPU share per simulated node, e.g. 0.25 (default auto: the visible GPUs shared "
        "among the nodes that run at once; 0 without CUDA)",
    )
    parser.add_argument(
        "--ray-address",
        default="",
        metavar="HOST:PORT",
        help="HOST:PORT of a running Ray cluster to simulate on (never started or stopped here)",
    )
    parser.add_argument(
        "--flwr-home",
        default=DEFAULT_FLWR_HOME,
        metavar="DIR",
        help=f"FLWR_HOME of the run's own SuperLink (default: {DEFAULT_FLWR_HOME})",
    )
    parser.add_argument(
        "--app",
        default=str(APP_DIR),
        metavar="DIR",
        help="the Flower app folder (default: fedcoord's own)",
    )
    parser.add_argument(
        "--run-config",
        default="",
        metavar='"k=v ..."',
        help='run-config overrides, e.g. "num-server-rounds=3"',
    )
    parser.add_argument(
        "--debug", action="store_true", help="log tracebacks of config and node errors too"
    )


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``fedcoord connection`` on ``parser``."""
    parser.add_argument(
        "--supernodes", type=int, default=10, metavar="N", help="simulated nodes (default: 10)"
    )
    parser.add_argument(
        "--num-cpus", type=float, default=1, metavar="C", help="CPUs per node (default: 1)"
    )
    parser.add_argument(
        "--num-gpus", type=float, default=0.0, metavar="G", help="GPU share per node (default: 0)"
    )
    parser.add_argument(
        "--flwr-home", metavar="DIR", help="Flower's home folder (default: $FLWR_HOME or ~/.flwr)"
    )
    parser.add_argument(
        "--name",
        default=DEFAULT_CONNECTION_NAME,
        help=f"connection name (default: {DEFAULT_CONNECTION_NAME})",
    )
    parser.add_argument(
        "--stop", action="store_true", help="stop the connection's SuperLink (by its PID)"
    )
