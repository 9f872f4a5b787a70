"""``fedcoord sweep``: every combination of a grid of run-config values, in simulation.

Usage::

    fedcoord sweep --grid "strategy=fedavg,median,krum seed=1,2,3" --parallel 2 --name cmp

runs the 9 combinations as runs named ``cmp-strategy=fedavg-seed=1`` ... on one
simulation SuperLink that this process starts and stops (by PID), ``--parallel``
at a time, then prints the comparison of the runs (:mod:`server.record.compare`) with
mean and standard deviation over seeds.

Every combination's run-config (:mod:`server.launch.sweep_grid`) is checked
before anything starts: a bad value is refused at once (exit 2) with the valid
options. Ctrl-C keeps the finished
runs, stops the runs in flight (``stop``, then their processes by PID) and exits
130; ``--resume`` runs only the combinations without a completed run, resuming
a stopped one from its last checkpoint. Exit code: 0 when every combination's
run completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from server.launch.processes import stop_process
from server.launch.run_config_text import parse_run_config_text
from server.launch.run_options import APP_DIR
from server.launch.simulation import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    FINAL_STATES,
    PlannedRun,
    flwr_run_command,
    local_superlink,
    plan_run,
    run_outcome,
)
from server.launch.sweep_grid import (
    Combination,
    check_base_run_config,
    check_carried,
    grid_combinations,
    parse_grid,
    run_config_text,
)
from server.preflight import parse_app_run_config
from server.record.compare import (
    NOT_COMPARED_KEYS,
    compare_records,
    read_run_record,
    validate_target,
)
from server.record.compare_report import format_comparison
from server.record.entries import check_run_entries, open_append_no_follow
from server.record.lifecycle import InvalidTransitionError
from server.record.operations import request_command
from server.record.runs import run_status
from server.record.store import DB_NAME, RunStoreError
from task.config import ConfigError, config_to_dict
from task.names import find_run_dir_problem
from task.text import escape_lines

RUN_LOG = "flwr-run.log"
POLL_S = 0.5
STOP_GRACE_S = 60.0


@dataclass(frozen=True)
class SweepStep:
    """A combination checked against the runs directory: ``run``, ``resume`` or ``done``."""

    combination: Combination
    action: str
    planned: PlannedRun


# ------------------------------------------------------------------- plan
def plan_sweep(  # noqa: PLR0913
    app_dir: Path,
    grid_text: str,
    base: str,
    sweep: str,
    runs_dir: Path,
    resume: bool,
) -> list[SweepStep]:
    """Check every combination before anything starts; say what each one needs.

    Raises
    ------
    ConfigError
        With the first problem, prefixed by its combination: a value the app
        refuses (with the valid options), an existing sweep without ``--resume``,
        a run that cannot be resumed.
    """
    grid = parse_grid(grid_text)
    check_base_run_config(base, [key for key, _ in grid])
    steps = []
    for combination in grid_combinations(grid, sweep):
        try:
            steps.append(_plan_step(app_dir, base, combination, runs_dir, resume))
        except ConfigError as error:
            raise ConfigError(f"{combination.label}: {error}") from None
    return steps


def _plan_step(
    app_dir: Path, base: str, combination: Combination, runs_dir: Path, resume: bool
) -> SweepStep:
    fresh = run_config_text(base, combination, runs_dir, resume=False)
    check_carried(fresh, base, combination, runs_dir)
    config = parse_app_run_config(app_dir, fresh)
    run_dir = config.resolved_runs_dir / config.run_name  # where the run will write
    name = combination.run_name
    problem = find_run_dir_problem(runs_dir, name)
    if problem is not None or run_dir != runs_dir / name:
        raise ConfigError(problem or f"run {name} would not be written to {runs_dir}")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir} is a file, not a run folder; move it away or choose another --name"
        )
    check_run_entries(run_dir)
    if not (run_dir / DB_NAME).exists():
        return SweepStep(combination, "run", plan_run(app_dir, fresh))
    if not resume:
        raise ConfigError(
            f"run {name} already exists in {runs_dir}; continue the sweep "
            "with --resume, or start another with a new --name"
        )
    explicit = {*parse_run_config_text(base), *dict(combination.values)}
    state = _check_same_config(config_to_dict(config), run_dir, explicit)
    if state == "completed":
        return SweepStep(combination, "done", PlannedRun("", run_dir, None))
    if state in ("running", "paused", "stopping"):
        raise ConfigError(
            f"run {name} is {state}; wait for it to end, or stop it with fedcoord stop {name}"
        )
    again = run_config_text(base, combination, runs_dir, resume=True)
    return SweepStep(combination, "resume", plan_run(app_dir, again))


def _check_same_config(wanted: dict[str, object], run_dir: Path, explicit: set[str]) -> str:
    """The existing run's state, after checking it was started with this run-config.

    Its stored config must be readable and hold every key the sweep sets
    (``explicit``: --grid and --run-config), each with the value asked for.
    """
    try:
        record = read_run_record(run_dir)
    except RunStoreError as error:
        raise ConfigError(f"{error}; or move {run_dir} away to run it again") from None
    missing = sorted(explicit - set(record.config))
    if missing:
        raise ConfigError(
            f"run {run_dir.name}'s stored config has no readable {missing[0]} "
            f"(fedcoord verify {run_dir.name} says more); move {run_dir} away to run it again"
        )
    for key in sorted(set(wanted) & set(record.config) - NOT_COMPARED_KEYS):
        if record.config[key] != wanted[key]:
            raise ConfigError(
                f"run {run_dir.name} was started with {key}={record.config[key]!r}, this sweep "
                f"asks for {wanted[key]!r}; resume with the same --grid and --run-config"
            )
    return record.state


# -------------------------------------------------------------------- run
@dataclass
class Launched:
    """A run in flight: its step, its ``flwr run`` process and when it started."""

    step: SweepStep
    number: int
    process: subprocess.Popen[bytes]
    started: float
    stop_asked: bool = False


class SweepRunner:
    """Run the steps on one SuperLink, ``parallel`` at a time, saying what happens."""

    def __init__(  # noqa: PLR0913
        self,
        app_dir: Path,
        supernodes: int,
        num_cpus: float,
        parallel: int,
        say: Callable[[str], None],
    ) -> None:
        self.app_dir, self.supernodes, self.num_cpus = app_dir, supernodes, num_cpus
        self.parallel, self.say = parallel, say
        self.in_flight: list[Launched] = []
        self.outcomes: dict[str, int] = {}

    def run(self, steps: Sequence[SweepStep], flwr_home: Path) -> None:
        """Run every step that is not done; on Ctrl-C stop those in flight, then re-raise."""
        todo = [s for s in steps if s.action != "done"]
        total = len(steps)
        with local_superlink(flwr_home) as link:
            try:
                queue = list(enumerate(todo, start=total - len(todo) + 1))
                while queue or self.in_flight:
                    while queue and len(self.in_flight) < self.parallel:
                        number, step = queue.pop(0)
                        command = flwr_run_command(
                            self.app_dir,
                            self.supernodes,
                            step.planned.run_config,
                            self.num_cpus,
                        )
                        self._start(step, number, total, command, link.env())
                    self._reap(total)
                    time.sleep(POLL_S)
            finally:
                self._stop_in_flight()

    def _start(
        self, step: SweepStep, number: int, total: int, command: list[str], env: dict[str, str]
    ) -> None:
        run_dir = step.planned.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(open_append_no_follow(run_dir / RUN_LOG), "ab") as log:
            process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        verb = "resumed" if step.action == "resume" else "started"
        self.say(f"[{number}/{total}] {verb} {step.combination.run_name}")
        self.in_flight.append(Launched(step, number, process, time.monotonic()))

    def _reap(self, total: int) -> None:
        for launched in [item for item in self.in_flight if item.process.poll() is not None]:
            self.in_flight.remove(launched)
            planned = launched.step.planned
            code, line = run_outcome(planned)
            name = launched.step.combination.run_name
            self.outcomes[name] = code
            took = f"{time.monotonic() - launched.started:.0f}s"
            if code == EXIT_OK:
                metrics = run_status(planned.run_dir)["metrics"]
                accuracy = metrics.get("central_accuracy") if isinstance(metrics, dict) else None
                shown = f"{accuracy:.4f}" if isinstance(accuracy, float) else "-"
                self.say(
                    f"[{launched.number}/{total}] {name} completed in {took}: "
                    f"final accuracy {shown}"
                )
            else:
                log = planned.run_dir / RUN_LOG
                self.say(f"[{launched.number}/{total}] {line} ({took}; log: {log})")

    def _stop_in_flight(self) -> None:
        """Ask each run in flight to stop, wait until it has, then stop its processes by PID.

        A run whose ServerApp has not created its run store yet is asked again
        on each poll until it has. Once its store records a final state, the rest
        (``flwr run`` streaming, the simulation's teardown) is stopped by PID
        rather than waited for. A second Ctrl-C skips the wait.
        """
        if self.in_flight:
            self.say(f"stopping {len(self.in_flight)} runs in flight (Ctrl-C again: at once)")
        deadline = time.monotonic() + STOP_GRACE_S
        try:
            while time.monotonic() < deadline:
                alive = [item for item in self.in_flight if not _ended(item)]
                if not alive:
                    break
                for launched in alive:
                    launched.stop_asked = launched.stop_asked or _ask_to_stop(launched)
                time.sleep(POLL_S)
        finally:
            for launched in self.in_flight:
                stop_process(launched.process)
                self.say(f"[{launched.number}] stopped {launched.step.combination.run_name}")


def _ended(launched: Launched) -> bool:
    """Whether the run's ``flwr run`` exited or its store records a final state."""
    if launched.process.poll() is not None:
        return True
    try:
        return run_status(launched.step.planned.run_dir)["state"] in FINAL_STATES
    except (RunStoreError, sqlite3.Error):
        return False


def _ask_to_stop(launched: Launched) -> bool:
    """Queue ``stop`` for the run; False while it cannot be asked yet (no run store)."""
    try:
        request_command(launched.step.planned.run_dir, "stop")
    except InvalidTransitionError:  # it ended meanwhile: nothing to stop
        return True
    except (RunStoreError, sqlite3.Error):
        return False
    return True


# ------------------------------------------------------------------ report
def report(steps: Sequence[SweepStep], target: float | None) -> list[str]:
    """The comparison of every combination's run that can be read."""
    records, missing = [], []
    for step in steps:
        try:
            records.append(read_run_record(step.planned.run_dir))
        except RunStoreError:
            missing.append(step.combination.run_name)
    lines = format_comparison(compare_records(records, target)) if records else []
    if missing:
        lines.append(f"no readable run for: {', '.join(missing)}")
    return lines


def check_runs_dir(runs_dir: Path, writable: bool) -> None:
    """Refuse a ``--runs-dir`` that is a file, is under one or, if ``writable``, cannot be written.

    Raises
    ------
    ConfigError
        Naming the folder and the fix.
    """
    existing = next(path for path in (runs_dir, *runs_dir.parents) if path.exists())
    if not existing.is_dir():
        raise ConfigError(
            f"--runs-dir {runs_dir}: {existing} is a file, not a folder; name a folder"
        )
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--runs-dir {runs_dir}: {existing} is not writable; name a folder you can write to"
        )


def run_sweep(args: argparse.Namespace) -> int:
    """``fedcoord sweep``: check, run and compare; the exit code says how it went."""
    runs_dir = Path(args.runs_dir).expanduser().resolve()
    app_dir = Path(args.app or APP_DIR).resolve()
    sweep = args.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    try:
        target = validate_target(args.target)
        if args.parallel < 1 or args.supernodes < 1:
            raise ConfigError("--parallel and --supernodes must be at least 1")
        if not (math.isfinite(args.num_cpus) and args.num_cpus > 0):
            raise ConfigError(
                f"--num-cpus must be a positive number of CPUs per simulated node, "
                f"got {args.num_cpus}; e.g. 1 or 0.5"
            )
        if args.resume and not args.name:
            raise ConfigError("--resume needs --name SWEEP, the sweep to continue")
        check_runs_dir(runs_dir, writable=False)
        steps = plan_sweep(app_dir, args.grid, args.run_config, sweep, runs_dir, args.resume)
        if any(step.action != "done" for step in steps):
            check_runs_dir(runs_dir, writable=True)
    except ConfigError as error:
        _say(str(error), error=True)
        return EXIT_CONFIG
    done = sum(step.action == "done" for step in steps)
    _say(
        f"sweep {sweep}: {len(steps)} runs in {runs_dir}"
        + (f", {done} already completed" if done else "")
        + f"; {args.parallel} at a time, {args.supernodes} simulated nodes each"
    )
    runner = SweepRunner(app_dir, args.supernodes, args.num_cpus, args.parallel, _say)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # stop everything, as Ctrl-C does
    flwr_home = Path(args.flwr_home) if args.flwr_home else Path(tempfile.mkdtemp("-fedcoord"))
    try:
        if done < len(steps):
            runner.run(steps, flwr_home)
    except KeyboardInterrupt:
        _say(
            f"interrupted: finished runs kept; run the rest with fedcoord --runs-dir {runs_dir} "
            f"sweep --name {sweep} --resume, with the same --grid and --run-config",
            error=True,
        )
        return EXIT_INTERRUPTED
    except RuntimeError as error:  # the SuperLink did not start
        _say(str(error), error=True)
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not args.flwr_home:
            shutil.rmtree(flwr_home, ignore_errors=True)
    print("\n".join(report(steps, target)), flush=True)
    completed = all(
        step.action == "done" or runner.outcomes.get(step.combination.run_name) == EXIT_OK
        for step in steps
    )
    return EXIT_OK if completed else EXIT_FAILED


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _say(line: str, error: bool = False) -> None:
    prefix = "fedcoord: " if error else ""
    print(prefix + escape_lines(line), file=sys.stderr if error else sys.stdout, flush=True)
