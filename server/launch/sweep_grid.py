"""The grid of a sweep: its combinations and each one's ``--run-config`` text.

``--grid "strategy=fedavg,median seed=1,2"`` is parsed into keys and value
texts (:func:`parse_grid`), every combination is named
``<sweep>-<key=value>-...`` (:func:`grid_combinations`) and given the
``--run-config`` text of its run (:func:`run_config_text`). flwr's parser
drops or rereads text it does not understand without a word, so every text is
checked to come back from it as the sweep means it (:func:`check_carried`).
"""

from __future__ import annotations

import itertools
import math
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.common.config import parse_config_args

from server.launch.run_config_text import parse_run_config_text
from task.config import ConfigError
from task.names import RUN_NAME_HINT, find_run_name_problem

# Keys the sweep sets itself for every run.
SWEEP_KEYS = ("run-name", "runs-dir", "resume")
PLAIN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Combination:
    """One point of the grid: its ``(key, value text)`` pairs and its run."""

    values: tuple[tuple[str, str], ...]
    run_name: str

    @property
    def label(self) -> str:
        """``strategy=median seed=1``."""
        return " ".join(f"{key}={_unquoted(value)}" for key, value in self.values)


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
    """Refuse --run-config text flwr would drop or misread, and keys the sweep or grid sets.

    Raises
    ------
    ConfigError
        Naming the key and where it belongs (:func:`parse_run_config_text`).
    """
    for key in sorted(parse_run_config_text(base)):
        if key in SWEEP_KEYS:
            raise ConfigError(f"--run-config: the sweep sets {key} itself; drop it")
        if key in grid_keys:
            raise ConfigError(f"{key} is in both --grid and --run-config; keep it in one")


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
