"""``fedcoord sweep``: every combination of a grid of run-config values, in simulation.

Usage::

    fedcoord sweep --grid "strategy=fedavg,median,krum seed=1,2,3" --parallel 2 --name cmp

runs the 9 combinations as runs named ``cmp-strategy=fedavg-seed=1`` ... on one
simulation SuperLink that this process starts and stops (by PID), ``--parallel``
at a time, then prints the comparison of the runs (:mod:`server.record.compare`) with
mean and standard deviation over seeds.

Every combination's run-config is checked before anything starts: a bad value
is refused at once (exit 2) with the valid options. Ctrl-C keeps the finished
runs, stops the runs in flight (``stop``, then their processes by PID) and exits
130; ``--resume`` runs only the combinations without a completed run, resuming
a stopped one from its last checkpoint. Exit code: 0 when every combination's
run completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.common.config import parse_config_args

from server.launch.processes import stop_process
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
from server.preflight import parse_app_run_config
from server.record.compare import (
    NOT_COMPARED_KEYS,
    compare_records,
    format_comparison,
    read_run_record,
    validate_target,
)
from server.record.lifecycle import InvalidTransitionError
from server.record.operations import request_command
from server.record.runs import run_status
from server.record.store import DB_NAME, RunStoreError
from task.config import ConfigError, config_to_dict
from task.names import RUN_NAME_HINT, find_run_dir_problem, find_run_name_problem

APP_DIR = Path(__file__).resolve().parents[2]
# Keys the sweep sets itself for every run.
SWEEP_KEYS = ("run-name", "runs-dir", "resume")
RUN_LOG = "flwr-run.log"
POLL_S = 0.5
STOP_GRACE_S = 60.0
# flwr's --run-config pairs (flwr.common.config.parse_config_args): a value is a word,
# or quoted '...' / "..." with no quote of its kind inside (no escapes). Text outside
# the pairs is dropped without a word, so the sweep refuses it.
PLAIN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
FLWR_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


@dataclass(frozen=True)
class Combination:
    """One point of the grid: its ``(key, value text)`` pairs and its run."""

    values: tuple[tuple[str, str], ...]
    run_name: str

    @property
    def label(self) -> str:
        """``strategy=median seed=1``."""
        return " ".join(f"{key}={_unquoted(value)}" for key, value in self.values)


@dataclass(frozen=True)
class SweepStep:
    """A combination checked against the runs directory: ``run``, ``resume`` or ``done``."""

    combination: Combination
    action: str
    planned: PlannedRun


# ------------------------------------------------------------------- grid
def split_outside_quotes(text: str, separators: str) -> list[str]:
    """``text`` split at any of ``separators`` outside '...' or "..." (quotes kept)."""
    parts, current, quote = [], "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in separators:
            parts.append(current)
            current = ""
            continue
        current += char
    if quote:
        raise ConfigError(f"--grid {text!r}: a quote is not closed")
    return [*parts, current]


def parse_grid(text: str) -> list[tuple[str, list[str]]]:
    """``"strategy=fedavg,median seed=1,2"`` as ``[(key, [value text, ...]), ...]``.

    Raises
    ------
    ConfigError
        On an entry that is not ``key=v1,v2,...``, a key given twice, a value
        given twice for one key, a key the sweep sets itself, or an empty grid.
    """
    grid: list[tuple[str, list[str]]] = []
    for entry in (e for e in split_outside_quotes(text.strip(), " \t\n") if e):
        key, _, values_text = entry.partition("=")
        values = [v.strip() for v in split_outside_quotes(values_text, ",")]
        if not key or not values_text or not all(values):
            raise ConfigError(f"--grid entry {entry!r} is not key=value,value,...")
        if not PLAIN_KEY.fullmatch(key):
            raise ConfigError(f"--grid entry {entry[:60]!r}: {key[:40]!r} is not a run-config key")
        if key in SWEEP_KEYS:
            raise ConfigError(f"--grid: the sweep sets {key} itself; use --name and --runs-dir")
        if any(key == seen for seen, _ in grid):
            raise ConfigError(f"--grid names {key} twice; list all its values in one entry")
        parsed = [_grid_value(value) for value in values]
        repeated = [v for i, v in enumerate(values) if _same_value(parsed[i], parsed[:i])]
        if repeated:
            raise ConfigError(f"--grid {key}: value {repeated[0]} is listed twice")
        grid.append((key, values))
    if not grid:
        raise ConfigError('--grid is empty; e.g. --grid "strategy=fedavg,median seed=1,2"')
    return grid


def _grid_value(text: str) -> object:
    """The value flwr reads from grid value ``text`` (``0.10`` -> 0.1, ``'a'`` -> "a").

    Raises
    ------
    ConfigError
        For a value no run-config can hold (a control character).
    """
    try:
        return tomllib.loads(f"v = {toml_value(text)}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"--grid value {text[:60]!r} cannot be a run-config value") from None


def _same_value(value: object, earlier: Sequence[object]) -> bool:
    """Whether ``value`` is one of ``earlier`` (``1`` and ``1.0`` alike; bool apart)."""
    return any(
        _same(value, other) or (value == other and bool not in (type(value), type(other)))
        for other in earlier
    )


def toml_value(text: str) -> str:
    """A grid value as run-config text: ``median`` -> ``"median"``.

    Numbers, booleans and quoted strings stay as typed; any other word is quoted.
    """
    try:
        tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        if '"' in text and "'" not in text:  # flwr cannot carry \" inside "..."
            return f"'{text}'"
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _unquoted(text: str) -> str:
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
    return text[1:-1] if quoted else text


def grid_combinations(grid: Sequence[tuple[str, list[str]]], sweep: str) -> list[Combination]:
    """Every combination of ``grid``, named ``<sweep>-<key=value>-...``, in grid order.

    Raises
    ------
    ConfigError
        If ``sweep`` or a name is not a valid run name (e.g. too long), holds a
        ``'`` (``run-name='...'`` cannot carry it), or two combinations would
        get the same name (``x='a',"a"``).
    """
    check_sweep_name(sweep)
    keys = [key for key, _ in grid]
    combinations: dict[str, Combination] = {}
    for values in itertools.product(*(values for _, values in grid)):
        pairs = tuple(zip(keys, values, strict=True))
        name = "-".join([sweep, *(f"{key}={_unquoted(value)}" for key, value in pairs)])
        problem = find_run_name_problem(name) or _quote_problem(name)
        if problem is not None:
            raise ConfigError(
                f"run name {name[:120]!r} of the sweep {problem}; choose a shorter --name "
                "or values that fit in a folder name"
            )
        combination = Combination(pairs, name)
        if name in combinations:
            raise ConfigError(
                f"--grid: {combinations[name].label!r} and {combination.label!r} would both "
                f"be run {name!r}; give each value once, written one way"
            )
        combinations[name] = combination
    return list(combinations.values())


def check_sweep_name(sweep: str) -> None:
    """Refuse a ``--name`` that cannot begin a run name.

    Raises
    ------
    ConfigError
        Saying why, and what a name may be.
    """
    problem = find_run_name_problem(sweep) or _quote_problem(sweep)
    if problem is not None:
        raise ConfigError(f"--name {sweep[:120]!r} {problem}; {RUN_NAME_HINT}")


def _quote_problem(name: str) -> str | None:
    """Why ``run-name='NAME'`` cannot carry ``name`` through flwr's --run-config, or None."""
    return (
        "holds a \"'\" (flwr's --run-config cannot carry it in run-name)" if "'" in name else None
    )


def run_config_text(base: str, combination: Combination, runs_dir: Path, resume: bool) -> str:
    """The ``--run-config`` text of one combination's run."""
    assignments = [f"{key}={toml_value(value)}" for key, value in combination.values]
    assignments += [f"run-name='{combination.run_name}'", f'runs-dir="{runs_dir}"']
    if resume:
        assignments.append("resume=true")
    return " ".join([base.strip(), *assignments]).strip()


def check_base_run_config(base: str, grid_keys: Sequence[str]) -> None:
    """Refuse --run-config keys the sweep sets itself or the grid sets.

    Raises
    ------
    ConfigError
        Naming the key and where it belongs.
    """
    if base.strip().endswith(".toml"):
        raise ConfigError(
            f"--run-config {base!r}: a sweep takes key=value pairs, not a .toml file; "
            "copy its keys into --run-config"
        )
    check_no_dropped_words(base)
    try:
        keys = set(parse_config_args([base])) if base.strip() else set()
    except Exception as error:  # click's and tomli's errors: say which text
        raise ConfigError(f"--run-config {base!r}: {error}") from None
    for key in sorted(keys):
        if key in SWEEP_KEYS:
            raise ConfigError(f"--run-config: the sweep sets {key} itself; drop it")
        if key in grid_keys:
            raise ConfigError(f"{key} is in both --grid and --run-config; keep it in one")


def check_no_dropped_words(text: str) -> None:
    """Refuse text that flwr's parser would drop without a word.

    ``num-server-rounds= 10`` sets nothing (the space ends the pair), nor does a
    word without ``=``.

    Raises
    ------
    ConfigError
        Naming the first such word and the fix.
    """
    outside, position = [], 0
    for match in FLWR_PAIR.finditer(text):
        outside.append(text[position : match.start()])
        position = match.end()
    outside.append(text[position:])
    for word in " ".join(outside).split():
        if word.endswith("=") and len(word) > 1:
            key = word[:-1]
            raise ConfigError(
                f"--run-config {text!r}: {key} has no value, and flwr would drop it; "
                f"write {key}=VALUE with no space after '=' (\"\" for an empty string)"
            )
        raise ConfigError(
            f"--run-config {text!r}: {word[:40]!r} is not key=value, and flwr would drop it; "
            "write key=value pairs separated by spaces"
        )


def check_carried(text: str, base: str, combination: Combination, runs_dir: Path) -> None:
    """Refuse a run-config text that flwr would read otherwise than the sweep means it.

    Every --run-config key, every grid value, ``run-name`` and ``runs-dir`` must
    come back from flwr's parser as written, and no other key.

    Raises
    ------
    ConfigError
        Naming what cannot be carried.
    """
    cannot = "flwr's --run-config cannot carry it (a quote inside a quoted value)"
    try:
        got = parse_config_args([text])
        wanted = parse_config_args([base]) if base.strip() else {}
    except Exception:  # click's and tomli's errors: our quoting broke
        raise ConfigError(f"its values: {cannot}; choose values without quotes") from None
    wanted.update(
        {key: tomllib.loads(f"v = {toml_value(v)}")["v"] for key, v in combination.values}
    )
    for key, value in wanted.items():
        if key not in got or not _same(got[key], value):
            raise ConfigError(f"{key}: {cannot}; choose a value without quotes")
    if got.get("runs-dir") != str(runs_dir):
        raise ConfigError(f"--runs-dir {runs_dir}: {cannot}; choose a folder without '\"'")
    extra = sorted(set(got) - set(wanted) - {"run-name", "runs-dir"})
    if got.get("run-name") != combination.run_name or extra:
        raise ConfigError(f"run name {combination.run_name!r}: {cannot}; choose another --name")


def _same(a: object, b: object) -> bool:
    """Equal values, NaN equal to NaN (``lr=nan`` is refused later, with its reason)."""
    nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return nan or (a == b and type(a) is type(b))


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
    if not (run_dir / DB_NAME).exists():
        return SweepStep(combination, "run", plan_run(app_dir, fresh))
    if not resume:
        raise ConfigError(
            f"run {name} already exists in {runs_dir}; continue the sweep "
            "with --resume, or start another with a new --name"
        )
    explicit = {*parse_config_args([base] if base.strip() else []), *dict(combination.values)}
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
        with open(run_dir / RUN_LOG, "ab") as log:
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
                accuracy = run_status(planned.run_dir)["metrics"].get("central_accuracy")  # type: ignore[union-attr]
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
    print(prefix + line, file=sys.stderr if error else sys.stdout, flush=True)
