"""The run configuration, parsed once from Flower's run config into a frozen dataclass.

This is the only module that reads string keys of ``run_config``. Every value is
checked here, at start, so that a bad key is refused before any round runs, with
the valid options named in the error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import unquote, urlparse

from task.names import (
    DATASET_NAMES,
    MODEL_NAMES,
    PARTITIONER_NAMES,
    RUN_NAME_HINT,
    find_run_name_problem,
)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_FORMS = "auto, cpu, mps, cuda, cuda:N"
NODE_WEIGHTS_PATTERN = re.compile(r"^\s*[0-9]+\s*=\s*[-+0-9.eE]+\s*$")
BYZANTINE_MODES: tuple[str, ...] = ("flip", "noise")
# How training nodes are drawn each round, and the privacy accounting that matches it
# (strategies/accounted.py): no amplification claimed, Poisson, fixed size without replacement.
SAMPLING_METHODS: tuple[str, ...] = ("fraction", "poisson", "fixed")
# The strategies whose noise-multiplier adds Gaussian noise calibrated to clipped updates.
NOISY_STRATEGIES: tuple[str, ...] = ("clipped", "dp-fixed-clipping", "dp-adaptive-clipping")


FAULT_KINDS: tuple[str, ...] = ("raise", "sleep", "nan", "delay")

# Asynchronous mode (FedBuff, issue 14): the strategies that stream, the staleness weights.
MODES: tuple[str, ...] = ("sync", "async")
ASYNC_STRATEGIES: tuple[str, ...] = ("fedavg", "mean", "weighted", "clipped")
STALENESS_WEIGHTS: tuple[str, ...] = ("constant", "polynomial")
CLIENT_DELAY_FORMS = (
    "'' (off), lognormal:SIGMA (median 1 s), or PARTITION=SECONDS,... (*=SECONDS: the rest)"
)
MAX_DELAY_SIGMA = 5.0

# The value of a training key that means "the dataset's default" (the pyproject default).
DATASET_DEFAULT = "auto"
# Local training defaults per dataset, for the keys a run leaves at "auto" (or unset).
# digits and fashion-mnist were measured (README, "Per-dataset training defaults");
# mnist and cifar10 have no offline copy here and take the 28x28 / common settings.
TRAINING_DEFAULTS: dict[str, dict[str, int | float]] = {
    "digits": {"local-epochs": 5, "batch-size": 16, "lr": 0.05, "momentum": 0.9},
    "fashion-mnist": {"local-epochs": 1, "batch-size": 16, "lr": 0.01, "momentum": 0.9},
    "mnist": {"local-epochs": 1, "batch-size": 16, "lr": 0.01, "momentum": 0.9},
    "cifar10": {"local-epochs": 1, "batch-size": 32, "lr": 0.01, "momentum": 0.9},
}
TRAINING_KEYS: tuple[str, ...] = ("local-epochs", "batch-size", "lr", "momentum")


# Operator weights (node-weights, fedcoord weight, the dashboard): partition ids in
# [0, 2^31), weights finite in [0, 1e6].
PARTITION_LIMIT = 2**31
MAX_OPERATOR_WEIGHT = 1e6
INT64_LIMIT = 2**63
SEED_LIMIT = 2**32

# MLflow tracking (tracking-uri): the forms accepted, and where a relative path goes.
TRACKING_FORMS = (
    "'' (off), sqlite:///PATH.db, a folder PATH or file:///PATH (MLflow's file store), "
    "http(s)://HOST[:PORT]; a relative PATH is under $FEDCOORD_HOME"
)
MLFLOW_EXTRA_HINT = "pip install 'fedcoord[mlflow]'"
DEFAULT_EXPERIMENT = "fedcoord"
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the fix."""


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run, with defaults that work offline.

    Attribute names are the run-config keys with ``-`` replaced by ``_``.
    """

    num_server_rounds: int = 5
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    round_timeout: float = 300.0
    server_lr: float = 1.0
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    node_weights: str = ""
    dataset: str = "digits"
    data_dir: str = ""
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    model: str = "simple-cnn"
    local_epochs: int = 5
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    proximal_mu: float = 0.0
    # trimmed-mean / fedtrimmedavg: fraction trimmed from each end, in [0, 0.5).
    trim_beta: float = 0.1
    # krum / multikrum / bulyan: f, the number of Byzantine updates to tolerate.
    num_malicious: int = 0
    # krum / multikrum: m, updates averaged (1 = Krum, > 1 = Multi-Krum).
    num_selected: int = 1
    # fedavgm: server momentum, in [0, 1).
    server_momentum: float = 0.9
    # fedadam / fedyogi: first- and second-moment decay, in [0, 1).
    fedopt_beta1: float = 0.9
    fedopt_beta2: float = 0.99
    # fedadam / fedyogi / fedadagrad: adaptivity tau, > 0.
    fedopt_tau: float = 1e-3
    # dp-adaptive-clipping: noise std of the clipped count (0 = none; needs > noise-multiplier / 2).
    dp_clipped_count_stddev: float = 0.0
    # Test only: partitions whose clients send Byzantine updates, e.g. "0,1,2"; "" = none.
    byzantine_partitions: str = ""
    # Test only: flip (received - 10 * honest update) or noise (norm 100x the honest update).
    byzantine_mode: str = "flip"
    # Test only: injected client faults by partition, e.g. "0=raise,1=sleep,2=nan,3=delay".
    faults: str = ""
    # Test only: partitions that send malformed replies of every kind, e.g. "0,1"; "" = none.
    hostile: str = ""
    device: str = "auto"
    seed: int = 42
    run_name: str = ""
    runs_dir: str = ""
    resume: bool = False
    # Fraction of each node's shard kept back as its local test split.
    local_test_fraction: float = 0.2
    # Seconds to wait at start for at least min-train-nodes nodes to register.
    node_wait_timeout: float = 120.0
    # Share of available nodes asked for federated evaluation, in [0, 1]; 0 = none.
    fraction_evaluate: float = 1.0
    # Fewest nodes sampled for federated evaluation; fewer available skips it that round.
    min_evaluate_nodes: int = 2
    # Federated evaluation every k rounds, and at the last round.
    evaluate_every: int = 1
    # sync: rounds; async: FedBuff, num-server-rounds counts model versions.
    mode: str = "sync"
    # async: trainings in flight (K).
    concurrency: int = 8
    # async: accepted updates per new model version (B).
    buffer_size: int = 4
    # async: updates trained from a version older than this many versions are rejected.
    max_staleness: int = 8
    # async: constant, or polynomial (1 + staleness) ** -staleness-exponent.
    staleness_weight: str = "polynomial"
    staleness_exponent: float = 0.5
    # Test/bench only: simulated client slowness (CLIENT_DELAY_FORMS); "" = none.
    client_delay: str = ""
    # MLflow tracking store (see TRACKING_FORMS); "" = no tracking.
    tracking_uri: str = ""
    # MLflow experiment that holds the run; "" = "fedcoord".
    tracking_experiment: str = ""
    # Node sampling each round: fraction (no amplification claimed), poisson, fixed.
    sampling: str = "fraction"
    # Delta of the (epsilon, delta) client-level DP guarantee reported per round.
    target_delta: float = 1e-5
    # Privacy budget: the run ends before a round would pass it; 0 = no budget.
    target_epsilon: float = 0.0
    # Training keys (of TRAINING_KEYS) that took the dataset's default, in that order.
    dataset_defaults: tuple[str, ...] = field(default=TRAINING_KEYS, compare=False)
    # Extra keys that a strategy reads (e.g. Flower built-ins' parameters).
    extra: Mapping[str, object] = field(default_factory=dict, compare=False)

    @property
    def resolved_runs_dir(self) -> Path:
        """Absolute folder that holds run directories."""
        if self.runs_dir:
            return Path(self.runs_dir).expanduser().resolve()
        return fedcoord_home() / "runs"

    @property
    def resolved_data_dir(self) -> Path:
        """Absolute folder where dataset files live or are downloaded."""
        if self.data_dir:
            return Path(self.data_dir).expanduser().resolve()
        return fedcoord_home() / "data"

    @property
    def resolved_tracking_uri(self) -> str:
        """The MLflow tracking URI of ``tracking-uri`` ("" = off), relative paths resolved."""
        return resolve_tracking_uri(self.tracking_uri)

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment of the run: ``tracking-experiment`` or ``fedcoord``."""
        return self.tracking_experiment or DEFAULT_EXPERIMENT

    @property
    def federated_evaluation(self) -> bool:
        """Whether any round evaluates on the nodes' local test splits."""
        return self.fraction_evaluate > 0 and self.local_test_fraction > 0

    def evaluates_in_round(self, server_round: int) -> bool:
        """Whether round ``server_round`` runs federated evaluation (every k, and the last)."""
        due = server_round % self.evaluate_every == 0 or server_round == self.num_server_rounds
        return self.federated_evaluation and due

    @property
    def training_summary(self) -> str:
        """``local-epochs=1 batch-size=16 lr=0.01 momentum=0.9 (fashion-mnist defaults: ...)``."""
        values = " ".join(f"{key}={getattr(self, _key_attribute(key)):g}" for key in TRAINING_KEYS)
        if not self.dataset_defaults:
            return values
        return f"{values} ({self.dataset} defaults: {', '.join(self.dataset_defaults)})"

    @property
    def parsed_node_weights(self) -> dict[int, float]:
        """Operator weights by partition id from ``node-weights``."""
        return parse_node_weights(self.node_weights)

    @property
    def parsed_byzantine_partitions(self) -> frozenset[int]:
        """Partition ids of the Byzantine clients from ``byzantine-partitions``."""
        return parse_partition_ids("byzantine-partitions", self.byzantine_partitions)


def make_run_name() -> str:
    """A fresh, sortable run name: ``run-YYYYmmdd-HHMMSS-<pid>``."""
    return time.strftime("run-%Y%m%d-%H%M%S") + f"-{os.getpid()}"


def fedcoord_home() -> Path:
    """Return ``$FEDCOORD_HOME`` (default ``~/.fedcoord``) as an absolute path."""
    return Path(os.environ.get("FEDCOORD_HOME", "~/.fedcoord")).expanduser().resolve()


def parse_node_weights(text: str) -> dict[int, float]:
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
    return weights


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
    refused = f"tracking-uri {text[:100]!r} is not supported; valid: {TRACKING_FORMS}"
    if text.startswith(("http://", "https://")):
        _require(text.isprintable() and not any(c.isspace() for c in text), refused)
        parsed = _parsed_uri(text, refused)
        try:
            port = parsed.port
        except ValueError:  # not a number, or outside [0, 65535]
            port = 0
        _require(bool(parsed.hostname) and (port is None or port > 0), refused)
        return text
    if text.startswith("sqlite:///"):
        path = text.removeprefix("sqlite:///")
        _require("?" not in path and "#" not in path, refused)
        return "sqlite:///" + str(_tracking_path(path, refused, text))
    if text.startswith("file:"):
        parsed = _parsed_uri(text, refused)
        _require(parsed.netloc in ("", "localhost") and not parsed.query, refused)
        return _tracking_path(unquote(parsed.path), refused, text).as_uri()
    _require(not _URI_SCHEME.match(text), refused)
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
    _require(bool(text.strip()) and text.isprintable(), refused)
    path = _expanded("tracking-uri", text)
    path = path if path.is_absolute() else fedcoord_home() / path
    normalized = Path(os.path.normpath(path))
    homes = {Path("/"), fedcoord_home()}
    with contextlib.suppress(RuntimeError):  # no home directory
        homes.add(Path.home().resolve())
    if normalized in homes:
        raise ConfigError(
            f"tracking-uri {uri[:100]!r} is {normalized}, which MLflow would fill with its "
            "own files; name a file or folder in it, e.g. sqlite:///mlruns.db"
        )
    return path


def mlflow_installed() -> bool:
    """Whether the ``mlflow`` extra is installed (checked without importing it: slow)."""
    return importlib.util.find_spec("mlflow") is not None


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


def _expanded(key: str, text: str) -> Path:
    """``text`` with ``~`` expanded; a ``~user`` that does not exist is a ConfigError."""
    try:
        return Path(text).expanduser()
    except RuntimeError as error:  # "Could not determine home directory."
        raise ConfigError(f"{key} {text!r}: {error}; use an absolute path") from None


def _is_ascii_digits(text: str) -> bool:
    """``"12"`` yes; ``"²"`` or ``"٣"`` (digits to ``str.isdigit``, not to ``int``) no."""
    return text.isascii() and text.isdigit()


def _key(attribute: str) -> str:
    return attribute.replace("_", "-")


def _coerce(key: str, value: object, default: object) -> object:
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


def _require_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r}; valid: {', '.join(choices)}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(config: RunConfig) -> None:
    """Refuse values no run can use; each message names the valid ones.

    Raises
    ------
    ConfigError
        On the first invalid value.
    """
    _require_choice("dataset", config.dataset, DATASET_NAMES)
    _require_choice("model", config.model, MODEL_NAMES)
    _require_choice("partitioner", config.partitioner, PARTITIONER_NAMES)
    _require(
        bool(DEVICE_PATTERN.match(config.device)),
        f"unknown device {config.device!r}; valid: {DEVICE_FORMS}",
    )
    _require(
        config.num_server_rounds >= 1,
        f"num-server-rounds must be >= 1, got {config.num_server_rounds}",
    )
    _require(
        0.0 < config.fraction_train <= 1.0,
        f"fraction-train must be in (0, 1], got {config.fraction_train}",
    )
    _require(
        config.min_train_nodes >= 1, f"min-train-nodes must be >= 1, got {config.min_train_nodes}"
    )
    _require(config.round_timeout > 0, f"round-timeout must be > 0, got {config.round_timeout}")
    _require(config.server_lr > 0, f"server-lr must be > 0, got {config.server_lr}")
    _require(config.clip_norm > 0, f"clip-norm must be > 0, got {config.clip_norm}")
    _require(
        config.noise_multiplier >= 0,
        f"noise-multiplier must be >= 0, got {config.noise_multiplier}",
    )
    _require(
        config.dirichlet_alpha > 0, f"dirichlet-alpha must be > 0, got {config.dirichlet_alpha}"
    )
    _require(
        config.classes_per_partition >= 1,
        f"classes-per-partition must be >= 1, got {config.classes_per_partition}",
    )
    _require(config.local_epochs >= 1, f"local-epochs must be >= 1, got {config.local_epochs}")
    _require(config.batch_size >= 1, f"batch-size must be >= 1, got {config.batch_size}")
    _require(config.lr > 0, f"lr must be > 0, got {config.lr}")
    _require(0 <= config.seed < SEED_LIMIT, f"seed must be in [0, 2^32), got {config.seed}")
    _require(0 <= config.momentum < 1, f"momentum must be in [0, 1), got {config.momentum}")
    _require(config.proximal_mu >= 0, f"proximal-mu must be >= 0, got {config.proximal_mu}")
    _validate_strategy_options(config)
    _require(
        0 <= config.local_test_fraction < 1,
        f"local-test-fraction must be in [0, 1), got {config.local_test_fraction}",
    )
    _require(
        0 <= config.fraction_evaluate <= 1,
        f"fraction-evaluate must be in [0, 1] (0 = no federated evaluation), "
        f"got {config.fraction_evaluate}",
    )
    _require(
        config.min_evaluate_nodes >= 1,
        f"min-evaluate-nodes must be >= 1, got {config.min_evaluate_nodes}",
    )
    _require(
        config.evaluate_every >= 1,
        f"evaluate-every must be >= 1 (rounds between federated evaluations), "
        f"got {config.evaluate_every}",
    )
    _require(
        not config.runs_dir or _expanded("runs-dir", config.runs_dir).is_absolute(),
        f"runs-dir must be an absolute path, got {config.runs_dir!r}",
    )
    if config.data_dir:
        _expanded("data-dir", config.data_dir)
    _require(
        not config.run_name or find_run_name_problem(config.run_name) is None,
        f"run-name {config.run_name[:100]!r} {find_run_name_problem(config.run_name)}; "
        f"{RUN_NAME_HINT}",
    )
    _require(
        not config.resume or bool(config.run_name),
        "resume=true needs run-name='NAME' of the run to continue",
    )
    parse_node_weights(config.node_weights)
    _validate_tracking(config)
    _validate_async(config)
    _validate_privacy(config)


def _validate_privacy(config: RunConfig) -> None:
    """Refuse privacy keys out of range (which strategies can be accounted: the registry)."""
    _require_choice("sampling", config.sampling, SAMPLING_METHODS)
    _require(
        0 < config.target_delta < 1,
        f"target-delta must be in (0, 1), e.g. 1e-5 (below 1 / number of nodes), "
        f"got {config.target_delta}",
    )
    _require(
        config.target_epsilon >= 0,
        f"target-epsilon must be >= 0 (0 = no privacy budget), got {config.target_epsilon}",
    )


def _validate_tracking(config: RunConfig) -> None:
    """Refuse a tracking store MLflow cannot be given, or tracking without MLflow."""
    _require(
        len(config.tracking_experiment) <= 200 and config.tracking_experiment.isprintable(),
        f"tracking-experiment must be printable and at most 200 characters, "
        f"got {config.tracking_experiment[:100]!r}",
    )
    if not config.resolved_tracking_uri:
        return
    _require(
        mlflow_installed(),
        f"tracking-uri needs MLflow, which is not installed: {MLFLOW_EXTRA_HINT}",
    )


def _validate_async(config: RunConfig) -> None:
    """Refuse a mode, buffer or staleness setting FedBuff cannot use."""
    _require_choice("mode", config.mode, MODES)
    _require_choice("staleness-weight", config.staleness_weight, STALENESS_WEIGHTS)
    _require(config.concurrency >= 1, f"concurrency must be >= 1, got {config.concurrency}")
    _require(config.buffer_size >= 1, f"buffer-size must be >= 1, got {config.buffer_size}")
    _require(config.max_staleness >= 0, f"max-staleness must be >= 0, got {config.max_staleness}")
    _require(
        0 <= config.staleness_exponent <= 10,
        f"staleness-exponent must be in [0, 10], got {config.staleness_exponent}",
    )
    _require(
        config.mode != "async" or config.strategy in ASYNC_STRATEGIES,
        f"strategy {config.strategy!r} cannot run in mode='async': FedBuff folds each update "
        "as it arrives, against the version it was trained from, which needs a streaming "
        f"aggregator; valid in async mode: {', '.join(ASYNC_STRATEGIES)}",
    )
    _require(
        config.mode != "async" or (config.target_epsilon == 0 and config.sampling == "fraction"),
        "target-epsilon and sampling are not accounted in mode='async' (FedBuff samples "
        "whichever node is idle); use mode='sync' for a privacy budget",
    )
    parse_client_delay(config.client_delay)


@dataclass(frozen=True)
class ClientDelay:
    """A parsed ``client-delay``: lognormal seconds, or fixed seconds by partition."""

    sigma: float | None = None
    seconds: Mapping[int, float] = field(default_factory=dict)
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
        _require(
            0 <= sigma <= MAX_DELAY_SIGMA,
            f"client-delay sigma must be in [0, {MAX_DELAY_SIGMA:g}], got {sigma:g}",
        )
        return ClientDelay(sigma=sigma)
    seconds: dict[int, float] = {}
    default_s = 0.0
    for entry in filter(None, (part.strip() for part in text.split(","))):
        partition, separator, value = (part.strip() for part in entry.partition("="))
        _require(bool(separator) and (partition == "*" or _is_ascii_digits(partition)), refused)
        delay = _finite_number(value, refused)
        _require(delay >= 0, f"client-delay: {delay:g} seconds for {partition} must be >= 0")
        if partition == "*":
            default_s = delay
        else:
            _require(
                int(partition) < PARTITION_LIMIT, f"client-delay: partition {partition} >= 2^31"
            )
            seconds[int(partition)] = delay
    return ClientDelay(seconds=seconds, default_s=default_s)


def _finite_number(text: str, refused: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(refused) from None
    _require(math.isfinite(value), refused)
    return value


def _validate_strategy_options(config: RunConfig) -> None:
    """Refuse out-of-range parameters of the aggregation strategies."""
    _require(0 <= config.trim_beta < 0.5, f"trim-beta must be in [0, 0.5), got {config.trim_beta}")
    _require(config.num_malicious >= 0, f"num-malicious must be >= 0, got {config.num_malicious}")
    _require(config.num_selected >= 1, f"num-selected must be >= 1, got {config.num_selected}")
    for key, value in (
        ("server-momentum", config.server_momentum),
        ("fedopt-beta1", config.fedopt_beta1),
        ("fedopt-beta2", config.fedopt_beta2),
    ):
        _require(0 <= value < 1, f"{key} must be in [0, 1), got {value}")
    _require(config.fedopt_tau > 0, f"fedopt-tau must be > 0, got {config.fedopt_tau}")
    _require(
        config.dp_clipped_count_stddev >= 0,
        f"dp-clipped-count-stddev must be >= 0, got {config.dp_clipped_count_stddev}",
    )
    _require_choice("byzantine-mode", config.byzantine_mode, BYZANTINE_MODES)
    parse_partition_ids("byzantine-partitions", config.byzantine_partitions)
    parse_faults(config.faults)
    parse_partition_ids("hostile", config.hostile)


def parse_faults(text: str) -> dict[int, str]:
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
    return faults


def parse_run_config(run_config: Mapping[str, object]) -> RunConfig:
    """Parse Flower's ``context.run_config`` into a validated :class:`RunConfig`.

    Keys this dataclass does not know are kept in ``extra`` for strategies that
    take their own parameters (e.g. ``proximal-mu`` for Flower's FedProx).

    Raises
    ------
    ConfigError
        If a value has the wrong type or is not one of the valid options.
    """
    defaults = RunConfig()
    known = {_key(f.name): f.name for f in fields(RunConfig) if f.name not in _NOT_KEYS}
    values: dict[str, object] = {}
    extra: dict[str, object] = {}
    for key, value in run_config.items():
        if key in TRAINING_KEYS and value == DATASET_DEFAULT:
            continue
        if key in known:
            attribute = known[key]
            values[attribute] = _coerce(key, value, getattr(defaults, attribute))
        else:
            extra[key] = value
    dataset_defaults = _apply_dataset_defaults(values, str(values.get("dataset", defaults.dataset)))
    config = RunConfig(**values, dataset_defaults=dataset_defaults, extra=extra)  # type: ignore[arg-type]
    validate_config(config)
    return config


_NOT_KEYS = ("extra", "dataset_defaults")


def _apply_dataset_defaults(values: dict[str, object], dataset: str) -> tuple[str, ...]:
    """Fill the training keys missing from ``values`` with ``dataset``'s defaults.

    Returns the keys filled in. An unknown dataset takes none: validation refuses it.
    """
    table = TRAINING_DEFAULTS.get(dataset)
    if table is None:
        return ()
    filled = tuple(key for key in TRAINING_KEYS if _key_attribute(key) not in values)
    for key in filled:
        values[_key_attribute(key)] = table[key]
    return filled


def _key_attribute(key: str) -> str:
    return key.replace("-", "_")


def config_to_dict(config: RunConfig) -> dict[str, object]:
    """Return the config as run-config keys, for the run store and checkpoints."""
    data = {
        _key(f.name): getattr(config, f.name) for f in fields(config) if f.name not in _NOT_KEYS
    }
    data.update(config.extra)
    return data
