"""Parsers of single run-config values: numbers, partition lists, delays, URIs.

A leaf module: it imports nothing from the project, so anything may use it.
Each parser refuses a bad value with a :class:`ConfigError` that names the fix;
:mod:`task.config` calls them while it reads ``run_config``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

K = TypeVar("K")
V = TypeVar("V")

NODE_WEIGHTS_PATTERN = re.compile(r"^\s*[0-9]+\s*=\s*[-+0-9.eE]+\s*$")
FAULT_KINDS: tuple[str, ...] = ("raise", "sleep", "nan", "delay")
CLIENT_DELAY_FORMS = (
    "'' (off), lognormal:SIGMA (median 1 s), or PARTITION=SECONDS,... (*=SECONDS: the rest)"
)
MAX_DELAY_SIGMA = 5.0

# Operator weights (node-weights, fedcoord weight, the dashboard): partition ids in
# [0, 2^31), weights finite in [0, 1e6].
PARTITION_LIMIT = 2**31
MAX_OPERATOR_WEIGHT = 1e6
INT64_LIMIT = 2**63

# MLflow tracking (tracking-uri): the forms accepted, and where a relative path goes.
TRACKING_FORMS = (
    "'' (off), sqlite:///PATH.db, a folder PATH or file:///PATH (MLflow's file store), "
    "http(s)://HOST[:PORT]; a relative PATH is under $FEDCOORD_HOME"
)
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the fix."""


class FrozenMap(Mapping[K, V]):
    """An immutable, hashable mapping, so that a frozen dataclass holding one stays hashable.

    It compares equal to any mapping with the same items (``FrozenMap({1: 2}) == {1: 2}``).
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._items: dict[K, V] = dict(items)

    def __getitem__(self, key: K) -> V:
        return self._items[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


def require(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def fedcoord_home() -> Path:
    """Return ``$FEDCOORD_HOME`` (default ``~/.fedcoord``) as an absolute path."""
    return Path(os.environ.get("FEDCOORD_HOME", "~/.fedcoord")).expanduser().resolve()


def expanded_path(key: str, text: str) -> Path:
    """``text`` with ``~`` expanded; a ``~user`` that does not exist is a ConfigError."""
    try:
        return Path(text).expanduser()
    except RuntimeError as error:  # "Could not determine home directory."
        raise ConfigError(f"{key} {text!r}: {error}; use an absolute path") from None


def _is_ascii_digits(text: str) -> bool:
    """``"12"`` yes; ``"²"`` or ``"٣"`` (digits to ``str.isdigit``, not to ``int``) no."""
    return text.isascii() and text.isdigit()


def coerce_value(key: str, value: object, default: object) -> object:
    """Convert ``value`` to the type of ``default``, or raise ConfigError."""
    expected = type(default)
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if not -INT64_LIMIT < value < INT64_LIMIT:
            raise ConfigError(f"{key} must be an integer below 2^63 in size, got {value!r}")
        return int(value)
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key} must be finite, got {value!r}")
        return float(value)
    return str(value)


def parse_node_weights(text: str) -> FrozenMap[int, float]:
    """Parse ``"0=2.0,3=0.5"`` into ``{0: 2.0, 3: 0.5}``.

    Raises
    ------
    ConfigError
        If an entry is malformed or a weight is negative or not finite.
    """
    weights: dict[int, float] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        if not NODE_WEIGHTS_PATTERN.match(entry):
            raise ConfigError(
                f"node-weights entry {entry!r} is malformed; use 'PARTITION=WEIGHT,...', "
                "e.g. node-weights='0=2.0,3=0.5'"
            )
        partition, weight_text = (part.strip() for part in entry.split("="))
        try:
            weight = float(weight_text)
        except ValueError:
            weight = math.nan
        if not 0 <= weight <= MAX_OPERATOR_WEIGHT:  # False for NaN
            raise ConfigError(
                f"node-weights: weight {weight_text} for partition "
                f"{partition} must be a finite number in [0, {MAX_OPERATOR_WEIGHT:g}]"
            )
        if int(partition) >= PARTITION_LIMIT:
            raise ConfigError(f"node-weights: partition {partition} must be in [0, 2^31)")
        weights[int(partition)] = weight
    return FrozenMap(weights)


def format_node_weights(weights: Mapping[int, float]) -> str:
    """The ``node-weights`` text of ``weights``: ``{0: 2.0}`` -> ``"0=2.0"``."""
    return ",".join(f"{partition}={weight!r}" for partition, weight in weights.items())


def parse_partition_ids(key: str, text: str) -> frozenset[int]:
    """Parse ``"0,1,2"`` into ``{0, 1, 2}``; ``""`` is the empty set.

    Raises
    ------
    ConfigError
        If an entry is not a non-negative integer.
    """
    entries = [part.strip() for part in text.split(",") if part.strip()]
    if not all(_is_ascii_digits(entry) for entry in entries):
        raise ConfigError(f"{key} must list partition ids like '0,1,2', got {text!r}")
    return frozenset(int(entry) for entry in entries)


def format_partition_ids(partitions: Iterable[int]) -> str:
    """The text of a partition list: ``{2, 0}`` -> ``"0,2"``."""
    return ",".join(str(partition) for partition in sorted(partitions))


def parse_faults(text: str) -> FrozenMap[int, str]:
    """Parse ``faults``: ``"0=raise,2=nan"`` -> ``{0: "raise", 2: "nan"}``.

    Raises
    ------
    ConfigError
        If an entry is malformed or names an unknown kind.
    """
    faults: dict[int, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        partition, _, kind = (part.strip() for part in entry.partition("="))
        if not _is_ascii_digits(partition) or kind not in FAULT_KINDS:
            raise ConfigError(
                f"faults entry {entry!r} is malformed; use PARTITION=KIND with KIND one of "
                f"{', '.join(FAULT_KINDS)}"
            )
        faults[int(partition)] = kind
    return FrozenMap(faults)


def format_faults(faults: Mapping[int, str]) -> str:
    """The ``faults`` text of ``faults``: ``{0: "raise"}`` -> ``"0=raise"``."""
    return ",".join(f"{partition}={kind}" for partition, kind in faults.items())


@dataclass(frozen=True)
class ClientDelay:
    """A parsed ``client-delay``: lognormal seconds, or fixed seconds by partition."""

    sigma: float | None = None
    seconds: FrozenMap[int, float] = FrozenMap()
    default_s: float = 0.0

    @property
    def active(self) -> bool:
        """Whether any partition is slowed down."""
        return self.sigma is not None or self.default_s > 0 or any(self.seconds.values())


def parse_client_delay(text: str) -> ClientDelay:
    """Parse ``client-delay``: ``lognormal:1.0`` or ``"*=0.5,3=2.5"``; ``""`` is none.

    Raises
    ------
    ConfigError
        For any other form, a negative or infinite delay, or sigma outside [0, 5].
    """
    text = text.strip()
    refused = f"client-delay {text[:100]!r} is malformed; valid: {CLIENT_DELAY_FORMS}"
    if not text:
        return ClientDelay()
    if text.startswith("lognormal:"):
        sigma = _finite_number(text.removeprefix("lognormal:"), refused)
        require(
            0 <= sigma <= MAX_DELAY_SIGMA,
            f"client-delay sigma must be in [0, {MAX_DELAY_SIGMA:g}], got {sigma:g}",
        )
        return ClientDelay(sigma=sigma)
    seconds: dict[int, float] = {}
    default_s = 0.0
    for entry in filter(None, (part.strip() for part in text.split(","))):
        partition, separator, value = (part.strip() for part in entry.partition("="))
        require(bool(separator) and (partition == "*" or _is_ascii_digits(partition)), refused)
        delay = _finite_number(value, refused)
        require(delay >= 0, f"client-delay: {delay:g} seconds for {partition} must be >= 0")
        if partition == "*":
            default_s = delay
        else:
            require(
                int(partition) < PARTITION_LIMIT, f"client-delay: partition {partition} >= 2^31"
            )
            seconds[int(partition)] = delay
    return ClientDelay(seconds=FrozenMap(seconds), default_s=default_s)


def format_client_delay(delay: ClientDelay) -> str:
    """The ``client-delay`` text of ``delay``; ``""`` when no partition is slowed down."""
    if delay.sigma is not None:
        return f"lognormal:{delay.sigma!r}"
    rest = [f"*={delay.default_s!r}"] if delay.default_s else []
    return ",".join(rest + [f"{partition}={s!r}" for partition, s in delay.seconds.items()])


def _finite_number(text: str, refused: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(refused) from None
    require(math.isfinite(value), refused)
    return value


def without_credentials(uri: str) -> str:
    """``uri`` with any ``user:password@`` removed, for showing it to others."""
    try:
        parts = urlsplit(uri)
    except ValueError:  # does not parse: drop whatever stands between // and @
        return re.sub(r"//[^/]*@", "//", uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def resolve_tracking_uri(text: str) -> str:
    """The URI MLflow is given for ``tracking-uri``; ``""`` stays ``""`` (off).

    The ServerApp runs in a folder of Flower's, so a relative path is taken under
    ``$FEDCOORD_HOME``: ``sqlite:///mlruns.db`` -> ``sqlite:////home/u/.fedcoord/mlruns.db``.
    A folder path or ``file:`` URI becomes ``file:///ABS`` (MLflow's file store);
    ``http(s)://`` (a tracking server) is kept as given.

    Raises
    ------
    ConfigError
        For any other scheme, a URI that does not parse, a server URI without a host
        or with a port outside [1, 65535], control characters or spaces, an ``sqlite:``
        URI with a query, or a path without a name or that is ``/``, ``$HOME`` or
        ``$FEDCOORD_HOME`` itself (MLflow would fill it with its own folders).
    """
    if not text:
        return ""
    shown = without_credentials(text)[:100]
    refused = f"tracking-uri {shown!r} is not supported; valid: {TRACKING_FORMS}"
    if text.startswith(("http://", "https://")):
        require(text.isprintable() and not any(c.isspace() for c in text), refused)
        parsed = _parsed_uri(text, refused)
        try:
            port = parsed.port
        except ValueError:  # not a number, or outside [0, 65535]
            port = 0
        require(bool(parsed.hostname) and (port is None or port > 0), refused)
        return text
    if text.startswith("sqlite:///"):
        path = text.removeprefix("sqlite:///")
        require("?" not in path and "#" not in path, refused)
        return "sqlite:///" + str(_tracking_path(path, refused, text))
    if text.startswith("file:"):
        parsed = _parsed_uri(text, refused)
        require(parsed.netloc in ("", "localhost") and not parsed.query, refused)
        return _tracking_path(unquote(parsed.path), refused, text).as_uri()
    require(not _URI_SCHEME.match(text), refused)
    return _tracking_path(text, refused, text).as_uri()


def _parsed_uri(text: str, refused: str):  # noqa: ANN202 - urllib's ParseResult
    """``urlparse(text)``, or the ConfigError ``refused`` where it does not parse."""
    try:
        return urlparse(text)
    except ValueError:  # "Invalid IPv6 URL", ...
        raise ConfigError(refused) from None


def _tracking_path(text: str, refused: str, uri: str) -> Path:
    """``text`` as an absolute path: ``~`` expanded, a relative one under ``$FEDCOORD_HOME``.

    ``/``, ``$HOME`` and ``$FEDCOORD_HOME`` themselves are refused: MLflow's stores
    write their own files and folders into the path they are given.
    """
    require(bool(text.strip()) and text.isprintable(), refused)
    path = expanded_path("tracking-uri", text)
    path = path if path.is_absolute() else fedcoord_home() / path
    # realpath: links resolved, and a leading // (which normpath keeps) collapsed
    path = normalized = Path(os.path.realpath("/" + str(path).lstrip("/")))
    homes = {Path("/"), fedcoord_home()}
    with contextlib.suppress(RuntimeError):  # no home directory
        homes.add(Path.home().resolve())
    if normalized in homes:
        raise ConfigError(
            f"tracking-uri {without_credentials(uri)[:100]!r} is {normalized}, which MLflow "
            "would fill with its "
            "own files; name a file or folder in it, e.g. sqlite:///mlruns.db"
        )
    return path
