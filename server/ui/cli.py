"""The ``fedcoord`` command line: inspect and control runs through their run directory."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from server.export.event_files import EventFileError
from server.launch.run_options import add_connection_arguments, add_run_arguments
from server.record import lifecycle
from server.record.compare import CompareError
from server.record.operations import request_command, request_weight
from server.record.runs import (
    RunNotFoundError,
    default_runs_dir,
    resolve_run_dir,
    run_status,
)
from server.record.store import RunStoreError
from server.ui.read_verbs import (
    cmd_compare,
    cmd_export,
    cmd_nodes,
    cmd_plot,
    cmd_runs,
    cmd_status,
    cmd_verify,
    cmd_watch,
    say,
)
from task.names import RunNameError

# Errors whose message is one line naming the run and the problem: printed, exit 2.
ONE_LINE_ERRORS = (
    RunNotFoundError,
    RunNameError,
    RunStoreError,
    CompareError,
    EventFileError,
    lifecycle.InvalidTransitionError,
)


def cmd_control(args: argparse.Namespace) -> int:
    """Queue pause / resume / stop after checking the run's state allows it."""
    run_dir = resolve_run_dir(Path(args.runs_dir), args.run)
    say(request_command(run_dir, args.command))
    if args.wait > 0:
        return _wait_for_state(run_dir, _settled_state(args.command), args.wait)
    return 0


def _settled_state(command: str) -> str:
    return {"pause": "paused", "resume": "running", "stop": "stopped"}[command]


def _wait_for_state(run_dir: Path, wanted: str, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = run_status(run_dir)["state"]
        if state == wanted:
            say(f"{run_dir.name} is {state}")
            return 0
        time.sleep(0.2)
    say(f"{run_dir.name} is {run_status(run_dir)['state']}, not {wanted}, after {timeout_s}s")
    return 1


def cmd_weight(args: argparse.Namespace) -> int:
    """Queue an operator weight for a partition, used from the next round."""
    run_dir = resolve_run_dir(Path(args.runs_dir), args.run)
    say(request_weight(run_dir, args.partition, args.weight))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the app in simulation on a SuperLink of its own; the exit code says how it ended.

    A ``--runs-dir`` other than the default becomes the run's ``runs-dir``.
    """
    # Both import Flower: only when running.
    from server.launch.run_config_text import with_runs_dir
    from server.launch.simulation import EXIT_CONFIG, run_from_args
    from task.config import ConfigError

    runs_dir = Path(args.runs_dir).expanduser()
    if runs_dir != default_runs_dir():
        try:
            args.run_config = with_runs_dir(args.run_config, runs_dir.absolute())
        except ConfigError as error:
            say(f"fedcoord: {error}", file=sys.stderr)
            return EXIT_CONFIG
    return run_from_args(args)


def cmd_connection(args: argparse.Namespace) -> int:
    """Write a simulation connection for Flower's own commands, on a SuperLink started here."""
    from server.launch.connection import run_connection  # imports Flower: only when used

    return run_connection(args)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run every combination of a grid in simulation, then compare the runs."""
    from server.launch.sweep import run_sweep  # imports Flower: only when sweeping

    return run_sweep(args)


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve the web dashboard of the runs directory until Ctrl-C."""
    from server.ui.dashboard import dashboard_settings, serve, startup_lines

    try:
        settings = dashboard_settings(Path(args.runs_dir), args.host, args.public_origin)
    except ValueError as error:
        say(f"fedcoord: {error}", file=sys.stderr)
        return 2
    say("\n".join(startup_lines(settings, args.host, args.port)), flush=True)
    serve(settings, args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``fedcoord`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedcoord", description="Inspect and control fedcoord runs."
    )
    parser.add_argument(
        "--runs-dir",
        default=str(default_runs_dir()),
        help="folder of run directories (default: $FEDCOORD_HOME/runs)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # --runs-dir after the verb too: SUPPRESS keeps the value given before it.
    runs_dir_option = argparse.ArgumentParser(add_help=False)
    runs_dir_option.add_argument(
        "--runs-dir", default=argparse.SUPPRESS, help="folder of run directories"
    )

    def verb(name: str, text: str, reads_runs: bool = True) -> argparse.ArgumentParser:
        """A subcommand; ``reads_runs``: it reads runs, so a missing runs folder is refused."""
        command = sub.add_parser(name, help=text, parents=[runs_dir_option])
        command.set_defaults(reads_runs=reads_runs)
        return command

    run = verb(
        "run",
        "train in simulation on a SuperLink of its own; exit 0 completed, 1 failed, "
        "2 bad config, 3 stopped, 130 Ctrl-C",
        reads_runs=False,
    )
    add_run_arguments(run)
    run.set_defaults(func=cmd_run)
    connection = verb(
        "connection",
        "a simulation connection for flwr run . NAME, on a SuperLink started here",
        reads_runs=False,
    )
    add_connection_arguments(connection)
    connection.set_defaults(func=cmd_connection)
    runs = verb("runs", "list runs with state and progress")
    runs.set_defaults(func=cmd_runs)
    status = verb("status", "state, round k/N, last metrics, nodes, ETA")
    status.add_argument("run", nargs="?", help="run name (default: the newest run)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=cmd_status)
    watch = verb("watch", "live progress bar until the run ends")
    watch.add_argument("run", nargs="?", help="run name (default: the newest run)")
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    watch.set_defaults(func=cmd_watch)
    for command, text in (
        ("pause", "finish the round in flight, then wait"),
        ("resume", "start the next round"),
        ("stop", "abandon the round in flight and end the run"),
    ):
        control = verb(command, text)
        control.add_argument("run", help="run name")
        control.add_argument(
            "--wait", type=float, default=0.0, help="seconds to wait for the new state"
        )
        control.set_defaults(func=cmd_control, command=command)
    nodes = verb("nodes", "node table")
    nodes.add_argument("run", nargs="?", help="run name (default: the newest run)")
    nodes.set_defaults(func=cmd_nodes)
    weight = verb("weight", "operator weight of a partition, from the next round")
    weight.add_argument("run", help="run name")
    weight.add_argument("partition", type=int, help="partition id")
    weight.add_argument("weight", type=float, help="weight >= 0")
    weight.set_defaults(func=cmd_weight)
    plot = verb("plot", "accuracy / loss per round as a PNG")
    plot.add_argument("run", nargs="?", help="run name (default: the newest run)")
    plot.add_argument("-o", "--output", required=True, help="PNG file to write")
    plot.set_defaults(func=cmd_plot)
    compare = verb("compare", "runs side by side: accuracy, time to a target")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="two or more run names")
    compare.add_argument("--target", type=float, help="accuracy in [0, 1]: round and time to it")
    compare.add_argument("-o", "--output", help="PNG of accuracy per round and over wall time")
    compare.add_argument("--json", action="store_true", help="print one JSON object")
    compare.set_defaults(func=cmd_compare)
    sweep = verb("sweep", "every combination of a grid of run-config values", reads_runs=False)
    sweep.add_argument("--grid", required=True, help='e.g. "strategy=fedavg,median seed=1,2,3"')
    sweep.add_argument("--run-config", default="", help="settings of every run, as flwr run's")
    sweep.add_argument("--supernodes", type=int, default=10, help="simulated nodes of each run")
    sweep.add_argument("--parallel", type=int, default=1, help="runs at a time (default: 1)")
    sweep.add_argument("--name", help="sweep name, the prefix of its runs (default: the time)")
    sweep.add_argument("--resume", action="store_true", help="run only what did not complete")
    sweep.add_argument("--target", type=float, help="accuracy in [0, 1] for the comparison")
    sweep.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per simulated node")
    sweep.add_argument("--app", help="the Flower app folder (default: fedcoord's own)")
    sweep.add_argument("--flwr-home", help="FLWR_HOME of its SuperLink (default: a temp dir)")
    sweep.set_defaults(func=cmd_sweep)
    export = verb("export", "round rows as CSV, JSON lines or TensorBoard events")
    export.add_argument("run", nargs="?", help="run name (default: the newest run)")
    export.add_argument("--format", choices=("csv", "jsonl", "tensorboard"), default="csv")
    export.add_argument(
        "-o", "--output", help="file to write (default: stdout); tensorboard: the logdir"
    )
    export.set_defaults(func=cmd_export)
    verify = verb(
        "verify", "is the record intact: hash chains, their heads, checkpoints, run name?"
    )
    verify.add_argument("run", nargs="?", help="run name (default: the newest run)")
    verify.set_defaults(func=cmd_verify)
    dashboard = verb("dashboard", "web dashboard of the runs, live", reads_runs=False)
    dashboard.add_argument(
        "--host", default="127.0.0.1", help="address to bind; not loopback = token required"
    )
    dashboard.add_argument("--port", type=int, default=8765, help="TCP port (default: 8765)")
    dashboard.add_argument(
        "--public-origin",
        default=None,
        help="https://host of a TLS reverse proxy in front: its Origin is accepted, token needed",
    )
    dashboard.set_defaults(func=cmd_dashboard)
    return parser


def find_runs_dir_problem(runs_dir: Path) -> str | None:
    """Why ``runs_dir`` cannot hold runs to read (missing, not a folder), or None."""
    if runs_dir.is_dir():
        return None
    if runs_dir == default_runs_dir():
        missing = "no run has been started there" if not runs_dir.exists() else "not a folder"
        return (
            f"no runs folder at {runs_dir} (the default, $FEDCOORD_HOME/runs): {missing}; "
            "name the runs' folder with --runs-dir DIR"
        )
    if not runs_dir.exists():
        return (
            f"--runs-dir {runs_dir}: no such folder; name the runs-dir the runs were started "
            "with (--runs-dir goes before or after the verb)"
        )
    return f"--runs-dir {runs_dir}: not a folder; name the folder of the run directories"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedcoord`` console script."""
    args = build_parser().parse_args(argv)
    runs_dir = Path(args.runs_dir)
    if args.func is cmd_runs and runs_dir == default_runs_dir() and not runs_dir.exists():
        say(f"no runs yet in {runs_dir} (the default runs folder); start one with fedcoord run")
        return 0
    problem = find_runs_dir_problem(runs_dir) if args.reads_runs else None
    if problem is not None:
        say(f"fedcoord: {problem}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except ONE_LINE_ERRORS as error:
        say(f"fedcoord: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `fedcoord export | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
        return 1
    except OSError as error:  # a file to write or a folder to read
        where = f"{error.filename}: " if error.filename else ""
        say(f"fedcoord: {where}{error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
