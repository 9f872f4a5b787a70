"""``--run-config`` text, read as Flower reads it, refusing what Flower would drop.

Flower's parser (``flwr.common.config.parse_config_args``) takes the
``key=value`` pairs it can match and drops the rest without a word:
``num-server-rounds= 3`` sets nothing (the space ends the pair) and the run
goes on with the default. A value it cannot read as TOML (``dataset=mnist``,
``lr=abc``) gets one generic "invalid format" for the whole text. Every
launcher here (``fedcoord run``, ``make demo``, ``fedcoord sweep``) reads the
text through :func:`parse_run_config_text` instead: one line naming the key
and the fix, before anything starts.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path

from flwr.app.user_config import UserConfig
from flwr.common.config import parse_config_args

from task.config import ConfigError

# flwr's --run-config pairs (flwr.common.config.parse_config_args): a value is a word,
# or quoted '...' / "..." with no quote of its kind inside (no escapes).
FLWR_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")
QUOTE_HINT = "put string values in quotes, e.g. dataset='mnist'"


def parse_run_config_text(text: str) -> UserConfig:
    """The overrides flwr reads from ``text``, refusing any text it would drop or misread.

    Raises
    ------
    ConfigError
        For a .toml file name, a word outside the pairs (``key= value``, ``oops``),
        a value that is not TOML (an unquoted string), a key given twice.
    """
    if not text.strip():
        return {}
    if text.strip().endswith(".toml"):
        raise ConfigError(
            f"--run-config {text!r}: give key=value pairs, not a .toml file; "
            "copy its keys into --run-config"
        )
    seen: set[str] = set()
    for key, value in FLWR_PAIR.findall(text):
        check_pair(key, value)
        if key in seen:
            raise ConfigError(f"--run-config: {key} is given twice; give it once")
        seen.add(key)
    check_no_dropped_words(text)
    try:
        return dict(parse_config_args([text]))
    except Exception as error:  # click's and tomli's errors: say which text
        message = getattr(error, "message", str(error))
        raise ConfigError(f"--run-config {text!r}: {message}") from None


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


def check_pair(key: str, value: str) -> None:
    """Refuse one ``key=value`` pair that flwr cannot read, naming the key and the fix.

    Raises
    ------
    ConfigError
        For a key that is not a TOML key, a quote that is not closed, or a value
        that is not a number, a boolean or a quoted string.
    """
    try:
        tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"--run-config: {key[:40]!r} is not a run-config key") from None
    try:
        tomllib.loads(f"{key} = {value}")
    except tomllib.TOMLDecodeError:
        if value[0] in "'\"" and not (len(value) > 1 and value[-1] == value[0]):
            problem = f"{value[:40]} opens a quote it does not close; close it"
        else:
            problem = f"{value[:40]} is not a number, true / false or a quoted string"
        raise ConfigError(
            f"--run-config: invalid format for key {key!r}: {problem}; {QUOTE_HINT}"
        ) from None


def check_known_keys(overrides: Mapping[str, object], valid: Collection[str]) -> None:
    """Refuse an override of a key the app does not have, suggesting the nearest one.

    Raises
    ------
    ConfigError
        ``unknown run-config key 'num-server-round'; did you mean 'num-server-rounds'?``,
        or the list of valid keys when none is near.
    """
    unknown = sorted(set(overrides) - set(valid))
    if not unknown:
        return
    near = difflib.get_close_matches(unknown[0], sorted(valid), n=1)
    if near:
        raise ConfigError(f"unknown run-config key {unknown[0]!r}; did you mean {near[0]!r}?")
    raise ConfigError(
        f"unknown run-config key {', '.join(map(repr, unknown))}; "
        f"valid keys: {', '.join(sorted(valid))}"
    )


def with_runs_dir(text: str, runs_dir: Path) -> str:
    """``text`` with ``runs-dir`` set to ``runs_dir`` (``--runs-dir`` of ``fedcoord run``).

    Raises
    ------
    ConfigError
        If ``text`` sets another ``runs-dir``, or ``runs_dir`` holds a ``'``
        (flwr's --run-config cannot carry it in a literal string).
    """
    given = parse_run_config_text(text).get("runs-dir")
    if given is not None and Path(str(given)).expanduser() != runs_dir:
        raise ConfigError(
            f"--runs-dir {runs_dir} and --run-config runs-dir={given!r} differ; give one"
        )
    if given is not None:
        return text
    if "'" in str(runs_dir):
        raise ConfigError(f"--runs-dir {runs_dir}: flwr's --run-config cannot carry a \"'\"")
    return f"{text} runs-dir='{runs_dir}'".strip()
