"""The run configuration, parsed once from Flower's run config into a frozen dataclass.

This is the only module that reads string keys of ``run_config``. Every value is
checked here, at start, so that a bad key is refused before any round runs, with
the valid options named in the error. The parsers of single values (partition
lists, delays, URIs) and :class:`ConfigError` live in :mod:`task.config_values`;
``ConfigError`` and ``fedcoord_home`` are imported from here as well.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

from task.config_values import (
    ClientDelay,
    ConfigError,
    FrozenMap,
    coerce_value,
    expanded_path,
    fedcoord_home,
    format_client_delay,
    format_faults,
    format_node_weights,
    format_partition_ids,
    parse_client_delay,
    parse_faults,
    parse_node_weights,
    parse_partition_ids,
    require,
    resolve_tracking_uri,
)
from task.names import (
    CUDA_GRAPH_CHOICES,
    DATASET_NAMES,
    MODEL_NAMES,
    PARTITIONER_NAMES,
    PRECISION_CHOICES,
    RUN_NAME_HINT,
    find_run_name_problem,
)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_FORMS = "auto, cpu, mps, cuda, cuda:N"
BYZANTINE_MODES: tuple[str, ...] = ("flip", "noise")
# How training nodes are drawn each round, and the privacy accounting that matches it
# (strategies/accounted.py): no amplification claimed, Poisson, fixed size without replacement.
SAMPLING_METHODS: tuple[str, ...] = ("fraction", "poisson", "fixed")
# The strategies whose noise-multiplier adds Gaussian noise calibrated to clipped updates.
NOISY_STRATEGIES: tuple[str, ...] = ("clipped", "dp-fixed-clipping", "dp-adaptive-clipping")

# Asynchronous mode (FedBuff, issue 14): the strategies that stream, the staleness weights.
MODES: tuple[str, ...] = ("sync", "async")
ASYNC_STRATEGIES: tuple[str, ...] = ("fedavg", "mean", "weighted", "clipped")
STALENESS_WEIGHTS: tuple[str, ...] = ("constant", "polynomial")

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
SEED_LIMIT = 2**32

# MLflow tracking (tracking-uri, TRACKING_FORMS): the extra it needs, the default experiment.
MLFLOW_EXTRA_HINT = "pip install 'fedcoord[mlflow]'"
DEFAULT_EXPERIMENT = "fedcoord"


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
    # Operator weight by partition id, e.g. "0=2.0,3=0.5" (strategy weighted).
    node_weights: FrozenMap[int, float] = FrozenMap()
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
    byzantine_partitions: frozenset[int] = frozenset()
    # Test only: flip (received - 10 * honest update) or noise (norm 100x the honest update).
    byzantine_mode: str = "flip"
    # Test only: injected client fault kind by partition, e.g. "0=raise,1=sleep,2=nan,3=delay".
    faults: FrozenMap[int, str] = FrozenMap()
    # Test only: partitions that send malformed replies of every kind, e.g. "0,1"; "" = none.
    hostile: frozenset[int] = frozenset()
    device: str = "auto"
    # Local training arithmetic: auto (fp32: bf16 measured slower on every shipped model),
    # fp32, bf16 (autocast).
    precision: str = "auto"
    # One SGD step captured as a CUDA graph and replayed: auto (on CUDA), on, off.
    cuda_graphs: str = "auto"
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
    client_delay: ClientDelay = ClientDelay()
    # MLflow tracking store (see TRACKING_FORMS), relative paths resolved; "" = no tracking.
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
    # The run-config text of the keys parsed into structured values (node-weights, ...),
    # as given: what config_to_dict stores. Set by parse_run_config only.
    given_text: Mapping[str, str] = field(default=FrozenMap(), compare=False)

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


def make_run_name() -> str:
    """A fresh, sortable run name: ``run-YYYYmmdd-HHMMSS-<pid>``."""
    return time.strftime("run-%Y%m%d-%H%M%S") + f"-{os.getpid()}"


def mlflow_installed() -> bool:
    """Whether the ``mlflow`` extra is installed (checked without importing it: slow)."""
    return importlib.util.find_spec("mlflow") is not None


def _require_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r}; valid: {', '.join(choices)}")


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
    _require_choice("precision", config.precision, PRECISION_CHOICES)
    _require_choice("cuda-graphs", config.cuda_graphs, CUDA_GRAPH_CHOICES)
    require(
        bool(DEVICE_PATTERN.match(config.device)),
        f"unknown device {config.device!r}; valid: {DEVICE_FORMS}",
    )
    require(
        config.num_server_rounds >= 1,
        f"num-server-rounds must be >= 1, got {config.num_server_rounds}",
    )
    require(
        0.0 < config.fraction_train <= 1.0,
        f"fraction-train must be in (0, 1], got {config.fraction_train}",
    )
    require(
        config.min_train_nodes >= 1, f"min-train-nodes must be >= 1, got {config.min_train_nodes}"
    )
    require(config.round_timeout > 0, f"round-timeout must be > 0, got {config.round_timeout}")
    require(config.server_lr > 0, f"server-lr must be > 0, got {config.server_lr}")
    require(config.clip_norm > 0, f"clip-norm must be > 0, got {config.clip_norm}")
    require(
        config.noise_multiplier >= 0,
        f"noise-multiplier must be >= 0, got {config.noise_multiplier}",
    )
    require(
        config.dirichlet_alpha > 0, f"dirichlet-alpha must be > 0, got {config.dirichlet_alpha}"
    )
    require(
        config.classes_per_partition >= 1,
        f"classes-per-partition must be >= 1, got {config.classes_per_partition}",
    )
    require(config.local_epochs >= 1, f"local-epochs must be >= 1, got {config.local_epochs}")
    require(config.batch_size >= 1, f"batch-size must be >= 1, got {config.batch_size}")
    require(config.lr > 0, f"lr must be > 0, got {config.lr}")
    require(0 <= config.seed < SEED_LIMIT, f"seed must be in [0, 2^32), got {config.seed}")
    require(0 <= config.momentum < 1, f"momentum must be in [0, 1), got {config.momentum}")
    require(config.proximal_mu >= 0, f"proximal-mu must be >= 0, got {config.proximal_mu}")
    _validate_strategy_options(config)
    require(
        0 <= config.local_test_fraction < 1,
        f"local-test-fraction must be in [0, 1), got {config.local_test_fraction}",
    )
    require(
        0 <= config.fraction_evaluate <= 1,
        f"fraction-evaluate must be in [0, 1] (0 = no federated evaluation), "
        f"got {config.fraction_evaluate}",
    )
    require(
        config.min_evaluate_nodes >= 1,
        f"min-evaluate-nodes must be >= 1, got {config.min_evaluate_nodes}",
    )
    require(
        config.evaluate_every >= 1,
        f"evaluate-every must be >= 1 (rounds between federated evaluations), "
        f"got {config.evaluate_every}",
    )
    require(
        not config.runs_dir or expanded_path("runs-dir", config.runs_dir).is_absolute(),
        f"runs-dir must be an absolute path, got {config.runs_dir!r}",
    )
    if config.data_dir:
        expanded_path("data-dir", config.data_dir)
    require(
        not config.run_name or find_run_name_problem(config.run_name) is None,
        f"run-name {config.run_name[:100]!r} {find_run_name_problem(config.run_name)}; "
        f"{RUN_NAME_HINT}",
    )
    require(
        not config.resume or bool(config.run_name),
        "resume=true needs run-name='NAME' of the run to continue",
    )
    _validate_tracking(config)
    _validate_async(config)
    _validate_privacy(config)


def _validate_privacy(config: RunConfig) -> None:
    """Refuse privacy keys out of range (which strategies can be accounted: the registry)."""
    _require_choice("sampling", config.sampling, SAMPLING_METHODS)
    require(
        0 < config.target_delta < 1,
        f"target-delta must be in (0, 1), e.g. 1e-5 (below 1 / number of nodes), "
        f"got {config.target_delta}",
    )
    require(
        config.target_epsilon >= 0,
        f"target-epsilon must be >= 0 (0 = no privacy budget), got {config.target_epsilon}",
    )


def _validate_tracking(config: RunConfig) -> None:
    """Refuse a tracking store MLflow cannot be given, or tracking without MLflow."""
    require(
        len(config.tracking_experiment) <= 200 and config.tracking_experiment.isprintable(),
        f"tracking-experiment must be printable and at most 200 characters, "
        f"got {config.tracking_experiment[:100]!r}",
    )
    if not config.tracking_uri:
        return
    require(
        mlflow_installed(),
        f"tracking-uri needs MLflow, which is not installed: {MLFLOW_EXTRA_HINT}",
    )


def _validate_async(config: RunConfig) -> None:
    """Refuse a mode, buffer or staleness setting FedBuff cannot use."""
    _require_choice("mode", config.mode, MODES)
    _require_choice("staleness-weight", config.staleness_weight, STALENESS_WEIGHTS)
    require(config.concurrency >= 1, f"concurrency must be >= 1, got {config.concurrency}")
    require(config.buffer_size >= 1, f"buffer-size must be >= 1, got {config.buffer_size}")
    require(config.max_staleness >= 0, f"max-staleness must be >= 0, got {config.max_staleness}")
    require(
        0 <= config.staleness_exponent <= 10,
        f"staleness-exponent must be in [0, 10], got {config.staleness_exponent}",
    )
    require(
        config.mode != "async" or config.strategy in ASYNC_STRATEGIES,
        f"strategy {config.strategy!r} cannot run in mode='async': FedBuff folds each update "
        "as it arrives, against the version it was trained from, which needs a streaming "
        f"aggregator; valid in async mode: {', '.join(ASYNC_STRATEGIES)}",
    )
    require(
        config.mode != "async" or (config.target_epsilon == 0 and config.sampling == "fraction"),
        "target-epsilon and sampling are not accounted in mode='async' (FedBuff samples "
        "whichever node is idle); use mode='sync' for a privacy budget",
    )


def _validate_strategy_options(config: RunConfig) -> None:
    """Refuse out-of-range parameters of the aggregation strategies."""
    require(0 <= config.trim_beta < 0.5, f"trim-beta must be in [0, 0.5), got {config.trim_beta}")
    require(config.num_malicious >= 0, f"num-malicious must be >= 0, got {config.num_malicious}")
    require(config.num_selected >= 1, f"num-selected must be >= 1, got {config.num_selected}")
    for key, value in (
        ("server-momentum", config.server_momentum),
        ("fedopt-beta1", config.fedopt_beta1),
        ("fedopt-beta2", config.fedopt_beta2),
    ):
        require(0 <= value < 1, f"{key} must be in [0, 1), got {value}")
    require(config.fedopt_tau > 0, f"fedopt-tau must be > 0, got {config.fedopt_tau}")
    require(
        config.dp_clipped_count_stddev >= 0,
        f"dp-clipped-count-stddev must be >= 0, got {config.dp_clipped_count_stddev}",
    )
    _require_choice("byzantine-mode", config.byzantine_mode, BYZANTINE_MODES)


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
    given_text: dict[str, str] = {}
    for key, value in run_config.items():
        if key in TRAINING_KEYS and value == DATASET_DEFAULT:
            continue
        if key in STRUCTURED_KEYS:
            given_text[key] = str(value)
            values[known[key]] = STRUCTURED_KEYS[key].parse(given_text[key])
        elif key in known:
            attribute = known[key]
            values[attribute] = coerce_value(key, value, getattr(defaults, attribute))
        else:
            extra[key] = value
    dataset_defaults = _apply_dataset_defaults(values, str(values.get("dataset", defaults.dataset)))
    config = RunConfig(
        **values,  # type: ignore[arg-type]
        dataset_defaults=dataset_defaults,
        extra=extra,
        given_text=FrozenMap(given_text),
    )
    validate_config(config)
    return config


_NOT_KEYS = ("extra", "dataset_defaults", "given_text")


@dataclass(frozen=True)
class StructuredKey:
    """A key whose text is parsed into a structured value, and written back as text."""

    parse: Callable[[str], Any]
    format: Callable[[Any], str]


# The keys parsed beyond a type: partition lists, weights, faults, delays, the tracking URI.
STRUCTURED_KEYS: dict[str, StructuredKey] = {
    "node-weights": StructuredKey(parse_node_weights, format_node_weights),
    "byzantine-partitions": StructuredKey(
        partial(parse_partition_ids, "byzantine-partitions"), format_partition_ids
    ),
    "faults": StructuredKey(parse_faults, format_faults),
    "hostile": StructuredKey(partial(parse_partition_ids, "hostile"), format_partition_ids),
    "client-delay": StructuredKey(parse_client_delay, format_client_delay),
    "tracking-uri": StructuredKey(resolve_tracking_uri, str),
}


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


def _key(attribute: str) -> str:
    return attribute.replace("_", "-")


def _key_attribute(key: str) -> str:
    return key.replace("-", "_")


def config_to_dict(config: RunConfig) -> dict[str, object]:
    """Return the config as run-config keys, for the run store and checkpoints.

    A structured key (:data:`STRUCTURED_KEYS`) is written as the text it was given,
    e.g. ``node-weights="0=2.0, 3=0.5"``; one never given is written from its value.
    """
    data = {
        _key(f.name): getattr(config, f.name) for f in fields(config) if f.name not in _NOT_KEYS
    }
    for key, structured in STRUCTURED_KEYS.items():
        data[key] = config.given_text.get(key, structured.format(data[key]))
    data.update(config.extra)
    return data
