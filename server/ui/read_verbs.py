"""The ``fedcoord`` verbs that read runs: runs, status, nodes, verify, export, plot, compare, watch.

Every line they print goes through :func:`say`, which escapes what a node or a file
on disk wrote (:func:`task.text.escape_unprintable`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

from server.export.event_files import write_round_events
from server.record import lifecycle
from server.record.compare import (
    CompareError,
    compare_run_dirs,
    resolve_compared,
    validate_target,
)
from server.record.compare_report import format_comparison, plot_comparison
from server.record.privacy_report import privacy_line
from server.record.results import plot_rounds, strict_json, write_rows
from server.record.runs import (
    list_run_dirs,
    name_note,
    resolve_run_dir,
    run_status,
    run_step,
)
from server.record.store import CorruptRunError, RunStore, RunStoreError
from server.record.verify import verify_run
from task.text import escape_lines, escape_unprintable

UNREADABLE = "unreadable"
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def say(*values: object, file: TextIO | None = None, flush: bool = False) -> None:
    """``print`` for every line this command line shows: what a node or a file wrote is escaped.

    Device strings, error texts, run folder names and messages come from nodes and
    from files that can be edited; a control sequence among them would reach the
    operator's terminal (set its title, erase lines). Each line is escaped on its own,
    so the command's own line breaks stay.
    """
    text = " ".join(str(value) for value in values)
    print(escape_lines(text), file=file or sys.stdout, flush=flush)


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
