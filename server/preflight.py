"""Checks that run before Flower starts: the run-config and the run directory.

Shared by the ServerApp (``server/app.py``) and the simulation launcher
(``server/launch/simulation.py``), so that ``make demo`` refuses a bad config with the
same one-line message as ``flwr run``, before any process is started.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from flwr.common.config import get_fused_config_from_dir

from server.launch.run_config_text import check_known_keys, parse_run_config_text
from server.record.runs import stored_config
from server.record.store import DB_NAME, RunStore, RunStoreError
from strategies.accounted import accounted
from strategies.protocol import RoundStrategy
from strategies.registry import build_strategy
from task.config import (
    NOISY_STRATEGIES,
    ConfigError,
    RunConfig,
    config_to_dict,
    parse_run_config,
)


def check_run_name_free(config: RunConfig, run_name: str) -> None:
    """Refuse a fresh run under the name of an existing one.

    Raises
    ------
    ConfigError
        Naming the command that resumes the existing run.
    """
    if (config.resolved_runs_dir / run_name / DB_NAME).exists():
        raise ConfigError(
            f"run {run_name!r} already exists in {config.resolved_runs_dir}; continue it with "
            f"--run-config \"run-name='{run_name}' resume=true\" or choose another run-name"
        )


def check_resumable_exists(config: RunConfig) -> None:
    """Refuse ``resume=true`` for a run that does not exist, or with other privacy settings.

    Raises
    ------
    ConfigError
        Naming the runs folder searched, or the privacy settings that differ
        (:func:`find_privacy_change`).
    """
    run_dir = config.resolved_runs_dir / config.run_name
    if not (run_dir / DB_NAME).exists():
        raise ConfigError(f"resume=true: no run {config.run_name!r} in {config.resolved_runs_dir}")
    try:
        store = RunStore(run_dir, readonly=True)
        try:
            stored = stored_config(store.run_row()["config_json"])
        finally:
            store.close()
    except RunStoreError:
        return  # damaged or older: opening it for the resume says so
    problem = find_privacy_change(stored, config)
    if problem is not None:
        raise ConfigError(problem)


def _app_defaults(app_dir: Path) -> dict[str, object]:
    """The run-config defaults of the app in ``app_dir``, or a one-line ConfigError."""
    try:
        return dict(get_fused_config_from_dir(app_dir, {}))
    except (ValueError, KeyError, TypeError, OSError) as error:  # no or a broken pyproject
        reason = " ".join(str(error).split())[:300]
        raise ConfigError(
            f"{app_dir} is not a Flower app with a [tool.flwr.app.config] table ({reason}); "
            "give --app the folder of fedcoord's pyproject.toml"
        ) from None


def parse_app_run_config(
    app_dir: Path, run_config_text: str, population: int | None = None
) -> RunConfig:
    """Parse ``--run-config`` text over the app's pyproject defaults, as ``flwr run`` does.

    ``population``, the number of nodes when the caller knows it, lets the
    privacy budget be checked for ``sampling='fixed'`` too
    (:func:`check_budget_covers_a_round`).

    Raises
    ------
    ConfigError
        On text flwr would drop or misread (:mod:`server.launch.run_config_text`),
        an unknown key (naming the nearest valid one), a value the run cannot use,
        a strategy that refuses its parameters or a privacy budget below one round.
    """
    overrides = parse_run_config_text(run_config_text)
    check_known_keys(overrides, _app_defaults(app_dir))
    config = parse_run_config(get_fused_config_from_dir(app_dir, overrides))
    try:  # the strategy's own checks (e.g. fedprox needs proximal-mu > 0)
        strategy = build_strategy(config)
    except ConfigError:
        raise
    except Exception as error:  # a parameter the strategy cannot take, whatever it raises
        raise ConfigError(
            f"strategy {config.strategy!r} refused its parameters: {type(error).__name__}: {error}"
        ) from error
    check_budget_covers_a_round(config, strategy, population)
    return config


def check_budget_covers_a_round(
    config: RunConfig, strategy: RoundStrategy, population: int | None
) -> None:
    """Refuse a fresh run whose ``target-epsilon`` is below what its first round costs.

    Such a run would stop before round 1 and end ``completed`` with nothing
    trained. The cost is the accountant's own (:class:`AccountedStrategy`): the
    epsilon one round of the run's noise and sampling reaches at ``target-delta``.
    ``sampling='fixed'`` depends on the number of nodes: unchecked without
    ``population``. A resumed run spends what its ledger has left: not checked here.

    Raises
    ------
    ConfigError
        Naming the epsilon one round costs and the settings it was computed for.
    """
    target = config.target_epsilon
    if target <= 0 or config.resume or (config.sampling == "fixed" and population is None):
        return
    accounted_strategy = accounted(strategy, config)
    first_round = accounted_strategy.next_event(population or 0)
    one_round = accounted_strategy.accountant.epsilon_after(first_round)
    if one_round <= target:
        return
    nodes = f", {population} nodes" if config.sampling == "fixed" else ""
    raise ConfigError(
        f"target-epsilon={target:g} is below the epsilon one round costs: {one_round:.4g} "
        f"(strategy {config.strategy!r}, noise-multiplier {config.noise_multiplier:g}, "
        f"sampling {config.sampling!r}{nodes}, target-delta {config.target_delta:g}), so no "
        f"round could train; set target-epsilon above {one_round:.4g}, more noise, or "
        "target-epsilon=0 (no budget)"
    )


# The keys an epsilon depends on: the rounds of one run must share them, so that one
# accountant (and every figure shown from the stored config) covers them all.
PRIVACY_KEYS: tuple[str, ...] = (
    "strategy",
    "noise-multiplier",
    "clip-norm",
    "sampling",
    "fraction-train",
    "min-train-nodes",
    "target-delta",
    "target-epsilon",
    "dp-clipped-count-stddev",
)


def find_privacy_change(stored: Mapping[str, object], config: RunConfig) -> str | None:
    """Why ``config`` may not resume the run stored as ``stored``, or None.

    A run with noise (stored or asked for) keeps its privacy settings on resume:
    its epsilon is accounted over every round at one noise, sampling and delta,
    and status, compare and the dashboard state it under the stored settings.
    """
    asked = config_to_dict(config)
    if not (_is_noisy(stored) or _is_noisy(asked)):
        return None
    changed = [
        f"{key} {stored.get(key)!r} -> {asked.get(key)!r}"
        for key in PRIVACY_KEYS
        if stored.get(key) != asked.get(key)
    ]
    if not changed:
        return None
    return (
        f"resume=true cannot change the privacy settings of run {config.run_name!r} "
        f"({'; '.join(changed)}); resume with the run's values, or start a new run"
    )


def _is_noisy(config: Mapping[str, object]) -> bool:
    noise = config.get("noise-multiplier")
    if isinstance(noise, bool) or not isinstance(noise, int | float):
        return False
    return config.get("strategy") in NOISY_STRATEGIES and noise > 0
