"""The ``fedcoord`` command line: inspect and control runs through their run directory."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from server.export.event_files import EventFileError, write_round_events
from server.launch.run_options import add_connection_arguments, add_run_arguments
from server.record import lifecycle
from server.record.compare import (
    CompareError,
    compare_run_dirs,
    resolve_compared,
    validate_target,
)
from server.record.compare_report import format_comparison, plot_comparison
from server.record.operations import request_command, request_weight
from server.record.privacy_report import privacy_line
from server.record.results import plot_rounds, strict_json, write_rows
from server.record.runs import (
    RunNotFoundError,
    default_runs_dir,
    list_run_dirs,
    name_note,
    resolve_run_dir,
    run_status,
    run_step,
)
from server.record.store import CorruptRunError, RunStore, RunStoreError
from server.record.verify import verify_run
from task.names import RunNameError
from task.text import escape_unprintable

UNREADABLE = "unreadable"
# Errors whose message is one line naming the run and the problem: printed, exit 2.
ONE_LINE_ERRORS = (
    RunNotFoundError,
    RunNameError,
    RunStoreError,
    CompareError,
    EventFileError,
    lifecycle.InvalidTransitionError,
)
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def say(*values: object, file: TextIO | None = None, flush: bool = False) -> None:
    """``print`` for every line this command line shows: what a node or a file wrote is escaped.

    Device strings, error texts, run folder names and messages come from nodes and
    from files that can be edited; a control sequence among them would reach the
    operator's terminal (set its title, erase lines). Each line is escaped on its own,
    so the command's own line breaks stay.
    """
    text = " ".join(str(value) for value in values)
    lines = "\n".join(escape_unprintable(line) for line in text.split("\n"))
    print(lines, file=file or sys.stdout, flush=flush)


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_seconds(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def cmd_runs(args: argparse.Namespace) -> int:
    """List runs by folder name (what every command takes) with state and progress.

    A folder whose run.db records another run name (copied or renamed) is noted.
    """
    runs_dir = Path(args.runs_dir)
    run_dirs = list_run_dirs(runs_dir)
    if not run_dirs:
        say(f"no runs in {runs_dir}")
        return 0
    say(f"{'RUN':<36} {'STATE':<12} {'ROUND':>9} {'ACCURACY':>9} {'BEST':>7}")
    for run_dir in run_dirs:
        try:
            status = run_status(run_dir)
        except RunStoreError as error:
            problem = error.problem if isinstance(error, CorruptRunError) else str(error)
            say(f"{run_dir.name:<36} {UNREADABLE:<12} {'-':>9} {'-':>9} {'-':>7}  {problem}")
            continue
        metrics = status["metrics"]
        accuracy = metrics.get("central_accuracy") if isinstance(metrics, dict) else None
        rounds = f"{status['current_round']}/{status['num_rounds']}"
        note = name_note(status)
        say(
            f"{run_dir.name:<36} {status['state']!s:<12} {rounds:>9} "
            f"{_fmt(accuracy):>9} {_fmt(status['best_accuracy']):>7}"
            + (f"  ({note})" if note else "")
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Show one run's state, round k/N, last metrics, nodes and ETA."""
    status = run_status(resolve_run_dir(Path(args.runs_dir), args.run))
    if args.json:
        say(strict_json(status))
        return 0
    metrics = status["metrics"] if isinstance(status["metrics"], dict) else {}
    note = name_note(status)
    say(f"run        {status['run_name']}{f'  ({note})' if note else ''}  ({status['run_dir']})")
    say(f"state      {status['state']}" + (f"  {status['message']}" if status["message"] else ""))
    say(
        f"{status.get('step', 'round')!s:<10} {status['current_round']}/{status['num_rounds']}"
        f"  ({100 * float(status['progress']):.0f}%)"  # type: ignore[arg-type]
        f"  phase {status['phase'] or '-'}"
        f"  replies {status['replies_received']}/{status['replies_expected']}"
    )
    say(
        f"metrics    central accuracy {_fmt(metrics.get('central_accuracy'))}"
        f"  central loss {_fmt(metrics.get('central_loss'))}"
        f"  train loss {_fmt(metrics.get('train_loss'))}"
        f"  federated accuracy {_fmt(metrics.get('federated_accuracy'))}"
    )
    training = status.get("training") or {}
    if isinstance(training, dict) and training:
        defaults = training.get("dataset-defaults") or []
        say(
            f"training   {training.get('dataset')}: local-epochs={training.get('local-epochs')} "
            f"batch-size={training.get('batch-size')} lr={training.get('lr')} "
            f"momentum={training.get('momentum')}"
            + (f" ({training.get('dataset')} defaults: {', '.join(defaults)})" if defaults else "")
        )
        say(f"evaluation central every round; federated {training.get('federated-evaluation')}")
    privacy = status.get("privacy")
    if isinstance(privacy, dict):
        say(f"privacy    {privacy_line(privacy)}")
    say(f"nodes      {status['nodes']}")
    refused = status.get("roll_call_refused")
    for refusal in refused if isinstance(refused, list) else []:
        say(f"roll call  refused {refusal}")
    say(f"eta        {_fmt_seconds(status['eta_s'])}")
    say(
        f"server     pid {status['server_pid']}, heartbeat "
        f"{_fmt(status['heartbeat_age_s'], 1)}s ago, flwr run {status['flwr_run_id']}"
    )
    return 0


def _open_store(args: argparse.Namespace) -> RunStore:
    return RunStore(resolve_run_dir(Path(args.runs_dir), args.run), readonly=True)


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


def cmd_nodes(args: argparse.Namespace) -> int:
    """Print the node table."""
    store = _open_store(args)
    try:
        nodes = store.nodes()
    finally:
        store.close()
    say(
        f"{'PARTITION':>9} {'NODE':>20} {'DEVICE':<8} {'EXAMPLES':>8} {'ROUNDS':>6} "
        f"{'FAILURES':>8} {'REJECTED':>8} {'WEIGHT':>6}  LAST ERROR"
    )
    for node in nodes:
        say(
            f"{_fmt(node['partition_id']):>9} {node['node_id']!s:>20} {node['device'] or '-':<8} "
            f"{node['num_examples']:>8} {node['rounds_joined']:>6} {node['failures']:>8} "
            f"{node['rejected']:>8} {float(node['weight']):>6.2f}  {node['last_error']}"  # type: ignore[arg-type]
        )
    return 0


def cmd_weight(args: argparse.Namespace) -> int:
    """Queue an operator weight for a partition, used from the next round."""
    run_dir = resolve_run_dir(Path(args.runs_dir), args.run)
    say(request_weight(run_dir, args.partition, args.weight))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check the record's hash chains, their heads, the checkpoint files and the run's name.

    Exit 1 on any problem.
    """
    run_dir = resolve_run_dir(Path(args.runs_dir), args.run)
    try:
        problems, summary = verify_run(run_dir)
    except RunStoreError as error:
        say(f"fedcoord: {error}", file=sys.stderr)
        return 1
    if problems:
        say(f"{run_dir.name}: {len(problems)} problem(s) in {summary}")
        for problem in problems:
            say(f"  {problem}")
        return 1
    say(f"{run_dir.name}: intact ({summary})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write the round rows as CSV or JSON lines, or as TensorBoard event files."""
    if args.format == "tensorboard" and not args.output:
        say("fedcoord: --format tensorboard needs -o DIR, the TensorBoard logdir", file=sys.stderr)
        return 2
    run_dir = resolve_run_dir(Path(args.runs_dir), args.run)
    store = RunStore(run_dir, readonly=True)
    try:
        rows, run = store.rounds(), store.run_row()
    finally:
        store.close()
    if args.format == "tensorboard":
        # The folder's name, checked when the run was found; never run.db's run_name.
        path, left_out = write_round_events(
            rows, run_dir.name, run["created_at"], Path(args.output)
        )
        say(f"wrote {len(rows)} rounds to {path}")
        if left_out:
            shown = ", ".join(left_out[:3]) + (
                f" and {len(left_out) - 3} more" if len(left_out) > 3 else ""
            )
            say(
                f"fedcoord: left out {len(left_out)} value(s) beyond float32's range "
                f"(TensorBoard's scalar type): {shown}",
                file=sys.stderr,
            )
        return 0
    output = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        write_rows(rows, args.format, output)
    finally:
        if args.output:
            output.close()
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Plot accuracy and loss per round to a PNG."""
    store = _open_store(args)
    try:
        run = store.run_row()
        rows, name = store.rounds(), str(run["run_name"])
    finally:
        store.close()
    plot_rounds(rows, name, Path(args.output), run_step(run["config_json"]))
    say(f"wrote {args.output}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Print runs side by side; plot their accuracy per round and over wall time."""
    target = validate_target(args.target)
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in PLOT_SUFFIXES:
        raise CompareError(f"-o {args.output}: name a .png file (or .svg, .pdf)")
    comparison = compare_run_dirs(resolve_compared(Path(args.runs_dir), args.runs), target)
    say(strict_json(comparison) if args.json else "\n".join(format_comparison(comparison)))
    if output is not None:
        plot_comparison(comparison, output)
        say(f"wrote {output}", file=sys.stderr if args.json else sys.stdout)
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


def cmd_watch(args: argparse.Namespace) -> int:
    """Redraw a progress line every second until the run ends."""
    run_dir = resolve_run_dir(Path(args.runs_dir), args.run)
    while True:
        status = run_status(run_dir)
        sys.stdout.write("\r" + escape_unprintable(progress_line(status)))
        sys.stdout.flush()
        if status["state"] in (*lifecycle.FINAL_STATES, lifecycle.INTERRUPTED):
            sys.stdout.write("\n")
            return 0
        time.sleep(args.interval)


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


def progress_line(status: dict[str, object], width: int = 30) -> str:
    """``[#####.....] round 3/10  replies 4/10  acc 0.9123  eps 1.25  ETA 1m05s  running``."""
    progress = float(status["progress"])  # type: ignore[arg-type]
    filled = int(round(progress * width))
    metrics = status["metrics"] if isinstance(status["metrics"], dict) else {}
    step = status.get("step", "round")
    privacy = status.get("privacy")
    epsilon = f"eps {privacy.get('epsilon_text')}  " if isinstance(privacy, dict) else ""
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {step} {status['current_round']}/"
        f"{status['num_rounds']}  replies {status['replies_received']}/"
        f"{status['replies_expected']}  acc {_fmt(metrics.get('central_accuracy'))}  "
        f"{epsilon}ETA {_fmt_seconds(status['eta_s'])}  {status['state']:<12}"
    )


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
