"""The ``fedcoord`` command line: inspect and control runs through their run directory."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from server.runs import (
    RunNotFoundError,
    default_runs_dir,
    list_run_dirs,
    resolve_run_dir,
    run_status,
)
from server.store import RunStoreError


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
    """List runs with state and progress."""
    runs_dir = Path(args.runs_dir)
    run_dirs = list_run_dirs(runs_dir)
    if not run_dirs:
        print(f"no runs in {runs_dir}")
        return 0
    print(f"{'RUN':<36} {'STATE':<12} {'ROUND':>9} {'ACCURACY':>9} {'BEST':>7}")
    for run_dir in run_dirs:
        try:
            status = run_status(run_dir)
        except RunStoreError as error:
            print(f"{run_dir.name:<36} unreadable: {error}")
            continue
        metrics = status["metrics"]
        accuracy = metrics.get("central_accuracy") if isinstance(metrics, dict) else None
        rounds = f"{status['current_round']}/{status['num_rounds']}"
        print(
            f"{status['run_name']!s:<36} {status['state']!s:<12} {rounds:>9} "
            f"{_fmt(accuracy):>9} {_fmt(status['best_accuracy']):>7}"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Show one run's state, round k/N, last metrics, nodes and ETA."""
    status = run_status(resolve_run_dir(Path(args.runs_dir), args.run))
    if args.json:
        print(json.dumps(status))
        return 0
    metrics = status["metrics"] if isinstance(status["metrics"], dict) else {}
    print(f"run        {status['run_name']}  ({status['run_dir']})")
    print(f"state      {status['state']}" + (f"  {status['message']}" if status["message"] else ""))
    print(
        f"round      {status['current_round']}/{status['num_rounds']}"
        f"  ({100 * float(status['progress']):.0f}%)"  # type: ignore[arg-type]
        f"  phase {status['phase'] or '-'}"
        f"  replies {status['replies_received']}/{status['replies_expected']}"
    )
    print(
        f"metrics    central accuracy {_fmt(metrics.get('central_accuracy'))}"
        f"  central loss {_fmt(metrics.get('central_loss'))}"
        f"  train loss {_fmt(metrics.get('train_loss'))}"
        f"  federated accuracy {_fmt(metrics.get('federated_accuracy'))}"
    )
    print(f"nodes      {status['nodes']}")
    print(f"eta        {_fmt_seconds(status['eta_s'])}")
    print(
        f"server     pid {status['server_pid']}, heartbeat "
        f"{_fmt(status['heartbeat_age_s'], 1)}s ago, flwr run {status['flwr_run_id']}"
    )
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
    runs = sub.add_parser("runs", help="list runs with state and progress")
    runs.set_defaults(func=cmd_runs)
    status = sub.add_parser("status", help="state, round k/N, last metrics, nodes, ETA")
    status.add_argument("run", nargs="?", help="run name (default: the newest run)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedcoord`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (RunNotFoundError, RunStoreError) as error:
        print(f"fedcoord: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
