"""Client-level DP accounting: epsilon per round, sampling, the budget, resume and refusals."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from flwr.app import Message, MetricRecord, RecordDict

from server.app import run_training
from server.preflight import parse_app_run_config
from server.record.runs import run_status
from server.record.store import RunStore
from server.ui.read_verbs import progress_line
from strategies.accountant import (
    LEDGER_KEY,
    PrivacyAccountant,
    PrivacyEvent,
    combined_noise_multiplier,
)
from strategies.accounted import AccountedStrategy, PrivacyBudgetReachedError, accounted
from strategies.aggregation import ClippedMeanAggregator, make_aggregator
from strategies.protocol import AccountedRounds, RoundStrategy
from strategies.registry import build_strategy
from strategies.sampling import NodeSampler
from task import keys
from task.config import ConfigError, parse_run_config
from tests.helpers import APP_DIR, ReplyingGrid, honest, local_client, make_coordinator, model

pytestmark = pytest.mark.usefixtures("server_identity")


def library_epsilon(event: object, rounds: int, delta: float, relation: object = None) -> float:
    """Epsilon as dp-accounting computes it directly for ``rounds`` compositions."""
    accountant = RdpAccountant(
        neighboring_relation=relation or NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


def strategy_for(**run_config: object) -> AccountedStrategy:
    config = parse_run_config(run_config)
    return accounted(build_strategy(config), config)


# ---------------------------------------------------------------------------
# The accountant against the library and the literature
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampling", "noise", "fraction", "nodes", "rounds", "delta"),
    [
        ("poisson", 1.0, 0.1, 100, 50, 1e-5),
        ("poisson", 0.5, 0.5, 10, 10, 1e-6),
        ("poisson", 1.1, 0.01, 1000, 300, 1e-5),
        ("fraction", 2.0, 0.3, 10, 20, 1e-5),
        ("fixed", 1.0, 0.1, 100, 30, 1e-5),
    ],
)
def test_reported_epsilon_equals_the_librarys_direct_computation(
    sampling, noise, fraction, nodes, rounds, delta
):
    # Prepare: the event dp-accounting is given for each sampling, built by hand here
    strategy = strategy_for(
        strategy="clipped",
        **{
            "noise-multiplier": noise,
            "sampling": sampling,
            "fraction-train": fraction,
            "target-delta": delta,
            "min-train-nodes": 1,
        },
    )
    gaussian = dp_event.GaussianDpEvent(noise)
    relation = None
    if sampling == "poisson":
        expected_event = dp_event.PoissonSampledDpEvent(fraction, gaussian)
    elif sampling == "fixed":  # replace-one: the library gets the noise over 2 C
        sample = math.ceil(fraction * nodes)
        expected_event = dp_event.SampledWithoutReplacementDpEvent(
            nodes, sample, dp_event.GaussianDpEvent(noise / 2)
        )
        relation = NeighboringRelation.REPLACE_ONE
    else:
        expected_event = gaussian

    # Execute: the rounds as the coordinator accounts them
    for _ in range(rounds):
        strategy.sample_train_nodes(range(nodes))
        strategy.accountant.compose(strategy._pending)  # what end_round composes

    # Assert
    expected = library_epsilon(expected_event, rounds, delta, relation)
    assert strategy.epsilon == pytest.approx(expected, rel=1e-12)
    assert 0 < strategy.epsilon < math.inf


def test_a_published_value_abadi_et_al_2016():
    # Abadi et al., "Deep Learning with Differential Privacy", CCS 2016
    # (https://arxiv.org/abs/1607.00133), Section 3.1: with sampling ratio q = 0.01,
    # noise sigma = 4, delta = 1e-5 and T = 10000 steps "we have epsilon ~ 1.26 using
    # the moments accountant" (9.34 by the strong composition theorem). The RDP
    # accountant with the conversion of Balle et al. 2020 is tighter than the moments
    # accountant's tail bound, so it must stay at or below the published 1.26, and
    # far below strong composition.
    accountant = PrivacyAccountant(target_delta=1e-5)

    # Execute
    accountant.compose(PrivacyEvent("poisson", 4.0, probability=0.01), 10_000)

    # Assert
    assert accountant.epsilon() <= 1.26
    assert accountant.epsilon() == pytest.approx(1.26, rel=0.2)  # 1.035 with dp-accounting 0.6
    assert accountant.epsilon() < 9.34 / 5


def test_a_round_without_noise_makes_epsilon_infinite_for_the_rest_of_the_run():
    # Prepare
    accountant = PrivacyAccountant(target_delta=1e-5)
    accountant.compose(PrivacyEvent("poisson", 1.0, probability=0.1), 5)
    finite = accountant.epsilon()

    # Execute
    accountant.compose(PrivacyEvent("poisson", 0.0, probability=0.1))
    accountant.compose(PrivacyEvent("poisson", 1.0, probability=0.1))

    # Assert
    assert 0 < finite < math.inf and accountant.epsilon() == math.inf


def test_the_ledger_replays_to_the_same_epsilon_and_merges_equal_rounds():
    # Prepare
    accountant = PrivacyAccountant(target_delta=1e-5)
    for noise in (1.0, 1.0, 1.0, 2.0, 1.0):
        accountant.compose(PrivacyEvent("poisson", noise, probability=0.2))
    restored = PrivacyAccountant(target_delta=1e-5)

    # Execute
    restored.load_state_dict(accountant.state_dict())

    # Assert: merged runs of equal events, same epsilon, and epsilon at another delta
    assert [count for _, count in restored.entries] == [3, 1, 1]
    assert restored.epsilon() == accountant.epsilon() and restored.rounds == 5
    other_delta = PrivacyAccountant(target_delta=1e-7)
    other_delta.load_state_dict(accountant.state_dict())
    assert other_delta.epsilon() > accountant.epsilon()


def test_a_checkpoint_without_a_ledger_has_rounds_of_unknown_privacy():
    accountant = PrivacyAccountant(target_delta=1e-5)
    accountant.load_state_dict({})
    assert accountant.epsilon() == math.inf


@pytest.mark.parametrize(
    ("ledger", "message"),
    [
        (b"[1, 2]", "does not hold a privacy ledger"),
        (b'{"adjacency": "replace-one", "events": []}', "accounted under replace-one"),
        (
            b'{"adjacency": "add-or-remove-one", "events": [["poisson", 1.0, 2.0, 0, 0, 1]]}',
            "out of range",
        ),
        (
            b'{"adjacency": "add-or-remove-one", "events": [["poisson", 1.0, 0.5, 0, 0, 0]]}',
            "bad count",
        ),
        (b'{"adjacency": "add-or-remove-one", "events": [["x", 1.0, 0.5, 0, 0, 1]]}', "malformed"),
    ],
)
def test_a_damaged_ledger_is_refused(ledger, message):
    accountant = PrivacyAccountant(target_delta=1e-5)
    with pytest.raises(ValueError, match=message):
        accountant.load_state_dict({LEDGER_KEY: np.frombuffer(ledger, dtype=np.uint8)})


def test_a_ledger_with_an_empty_fixed_sample_is_refused():
    fixed = PrivacyAccountant(target_delta=1e-5, adjacency="replace-one")
    empty_sample = b'{"adjacency": "replace-one", "events": [["fixed", 1.0, 1.0, 0, 0, 1]]}'
    with pytest.raises(ValueError, match="out of range"):
        fixed.load_state_dict({LEDGER_KEY: np.frombuffer(empty_sample, dtype=np.uint8)})


def test_adaptive_clipping_is_accounted_with_the_count_query_at_sensitivity_one():
    # Prepare: Flower splits noise-multiplier 1 into model noise z_model and count std 1
    strategy = strategy_for(
        strategy="dp-adaptive-clipping",
        **{"noise-multiplier": 1.0, "dp-clipped-count-stddev": 1.0},
    )
    layer = strategy.strategy.strategy
    z_model = (1.0**-2 - (2 * 1.0) ** -2) ** -0.5

    # Execute
    event = strategy.next_event(10)

    # Assert: both Gaussian sums composed, the 0/1 count at sensitivity 1
    assert layer.noise_multiplier == pytest.approx(z_model)
    assert event.noise_multiplier == pytest.approx((z_model**-2 + 1.0) ** -0.5)
    assert event.noise_multiplier == pytest.approx(combined_noise_multiplier(z_model, 1.0))
    assert 0.75 < event.noise_multiplier < 1.0


def test_adaptive_noise_is_topped_up_to_the_norm_the_updates_were_clipped_to():
    # Prepare: Flower clipped with norm 2.0, then lowered it to 1.2 and scaled its noise
    # to 1.2; 4 updates, server-lr 0.5
    strategy = strategy_for(
        strategy="dp-adaptive-clipping",
        **{"noise-multiplier": 1.0, "dp-clipped-count-stddev": 1.0, "server-lr": 0.5},
    )
    layer = strategy.strategy.strategy
    strategy._norm_before, layer.clipping_norm = 2.0, 1.2
    arrays = {"w": np.zeros(200_000, dtype=np.float32), "n": np.zeros(3, dtype=np.int64)}
    event = strategy.next_event(10)

    # Execute
    topped = strategy._top_up_adaptive_noise(event, layer, arrays, accepted=4)

    # Assert: std 0.5 * z_model * sqrt(2^2 - 1.2^2) / 4 added to float arrays only,
    # and the round accounted at the model noise it then has
    expected_std = 0.5 * layer.noise_multiplier * math.sqrt(2.0**2 - 1.2**2) / 4
    assert np.std(arrays["w"]) == pytest.approx(expected_std, rel=0.02)
    assert not arrays["n"].any()
    assert topped.noise_multiplier == pytest.approx(event.noise_multiplier)

    # Execute: when the norm went up, nothing is added and the event has more noise
    strategy._norm_before, layer.clipping_norm = 1.0, 1.5
    untouched = {"w": np.zeros(10, dtype=np.float32)}
    higher = strategy._top_up_adaptive_noise(event, layer, untouched, accepted=4)
    assert not untouched["w"].any()
    assert higher.noise_multiplier == pytest.approx(
        combined_noise_multiplier(1.5 * layer.noise_multiplier, 1.0)
    )


def test_a_delta_not_below_one_over_the_nodes_is_warned_about_once(caplog):
    # Prepare
    strategy = strategy_for(strategy="clipped", **{"noise-multiplier": 1.0, "target-delta": 0.05})

    # Execute
    with caplog.at_level("WARNING", logger="flwr"):
        strategy.sample_train_nodes(range(50))
        strategy.sample_train_nodes(range(50))

    # Assert
    warnings = [r.getMessage() for r in caplog.records if "target-delta" in r.getMessage()]
    assert len(warnings) == 1 and "not below 1 / 50 nodes" in warnings[0]


# ---------------------------------------------------------------------------
# Sampling and the fixed denominator
# ---------------------------------------------------------------------------


def test_poisson_sampling_is_reproducible_in_key_order_and_may_be_empty():
    # Prepare
    nodes = list(range(100, 140))
    by_partition = {node: 39 - i for i, node in enumerate(nodes)}

    # Execute
    first = NodeSampler(7).sample_poisson(nodes, 0.25, key=by_partition.get)
    second = NodeSampler(7).sample_poisson(reversed(nodes), 0.25, key=by_partition.get)
    sizes = [len(NodeSampler(seed).sample_poisson(nodes, 0.25)) for seed in range(300)]
    empty = NodeSampler(1).sample_poisson(nodes[:2], 1e-9)

    # Assert: same sample whatever the input order, in key order; about q * N joins
    assert first == second and first == sorted(first, key=by_partition.get)
    assert np.mean(sizes) == pytest.approx(10, rel=0.1) and len(set(sizes)) > 5
    assert empty == []


def test_the_fixed_denominator_scales_sum_and_noise_and_releases_with_no_update():
    # Prepare
    update = [np.full(40_000, 0.01, dtype=np.float32)]  # norm 2: clipped to 1
    plain = make_aggregator("clipped", clip_norm=1.0)
    fixed = ClippedMeanAggregator(clip_norm=1.0, denominator=4.0)
    noisy = ClippedMeanAggregator(clip_norm=1.0, noise_multiplier=2.0, seed=1, denominator=4.0)
    empty = ClippedMeanAggregator(clip_norm=1.0, noise_multiplier=2.0, seed=1, denominator=4.0)

    # Execute
    for aggregator in (plain, fixed, noisy):
        aggregator.add(update)
        aggregator.add(update)
    empty.expect([np.zeros(40_000, dtype=np.float32)])

    # Assert: sum / 4 instead of / 2; noise std 2 * 1 / 4, also with no update
    np.testing.assert_allclose(fixed.result()[0], plain.result()[0] / 2, rtol=1e-6)
    assert np.std(noisy.result()[0] - fixed.result()[0]) == pytest.approx(0.5, rel=0.03)
    assert np.std(empty.result()[0]) == pytest.approx(0.5, rel=0.03)
    with pytest.raises(ValueError, match="no updates"):
        make_aggregator("clipped").result()
    with pytest.raises(ValueError, match="needs a denominator"):
        make_aggregator("clipped").expect(update)  # type: ignore[attr-defined]


def test_poisson_clipped_divides_by_the_expected_count_and_ignores_min_train_nodes(tmp_path):
    # Prepare: 4 nodes, q = 0.5: the denominator is 2 whoever joins
    grid = ReplyingGrid([2, 3, 4, 5], honest)
    coordinator = make_coordinator(
        tmp_path,
        grid,
        strategy="clipped",
        **{
            "sampling": "poisson",
            "fraction-train": 0.5,
            "clip-norm": 100.0,
            "min-train-nodes": 4,
            "fraction-evaluate": 0.0,
            "seed": 3,
        },
    )

    # Execute
    new_model = coordinator.run_round(1, model())
    row = RunStore(tmp_path / "run", readonly=True).rounds()[-1]

    # Assert: honest node i adds 0.01 * i: the sum over the sample over 2, released
    # although fewer than min-train-nodes=4 joined
    joined = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"]
    assert 0 < len(joined) < 4 and row["updated"] == 1
    expected = model()["b"] + sum(0.01 * node for node in joined) / 2
    np.testing.assert_allclose(new_model["b"], expected, rtol=1e-6)


def test_dp_wrappers_average_with_equal_weights():
    # Prepare: two replies of different sizes; no noise, clip norm large
    base = model()

    def reply(node: int, examples: int, shift: float) -> Message:
        instruction = Message(RecordDict(), node, "train")
        arrays = {name: value + np.float32(shift) for name, value in base.items()}
        from strategies.records import pack_arrays

        metrics = {keys.NUM_EXAMPLES: examples, keys.PARTITION_ID: node, keys.TRAIN_LOSS: 0.1}
        content = RecordDict(
            {keys.ARRAYS: pack_arrays(arrays), keys.METRICS: MetricRecord(metrics)}
        )
        return Message(content=content, reply_to=instruction)

    strategy = strategy_for(strategy="dp-fixed-clipping", **{"clip-norm": 100.0})

    # Execute
    strategy.begin_round(1, base)
    strategy.add_reply(reply(2, 10, 0.1))
    strategy.add_reply(reply(3, 1000, 0.3))
    new_global, _ = strategy.end_round()

    # Assert: (0.1 + 0.3) / 2, not weighted by 10 and 1000 examples
    np.testing.assert_allclose(new_global["b"], base["b"] + 0.2, rtol=1e-5)


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_the_wrapper_delegates_the_round_seam_explicitly_and_wraps_once(name):
    # Prepare
    config = parse_run_config({"strategy": name, "server-lr": 0.01})
    strategy = build_strategy(config)
    partitions: dict[int, int | None] = {7: 3}

    # Execute
    wrapped = accounted(strategy, config)
    wrapped.set_node_partitions(partitions)

    # Assert: both sides declare the seam; the roll call reaches the replies' check;
    # nothing the seam does not name is forwarded
    assert RoundStrategy in type(strategy).__mro__
    assert AccountedRounds in type(wrapped).__mro__
    assert accounted(wrapped, config) is wrapped
    assert strategy.node_partitions is partitions
    assert not hasattr(wrapped, "sampler")


# ---------------------------------------------------------------------------
# The coordinator: epsilon per round, the budget, resume
# ---------------------------------------------------------------------------


def run_rounds(coordinator, count: int, first: int = 1) -> list[float]:  # noqa: ANN001
    arrays = model()
    for server_round in range(first, first + count):
        arrays = coordinator.run_round(server_round, arrays)
    return [float(r["epsilon"]) for r in rounds_metrics(coordinator.store.run_dir)]


def rounds_metrics(run_dir) -> list[dict]:  # noqa: ANN001
    import json

    store = RunStore(run_dir, readonly=True)
    try:
        return [json.loads(str(r["metrics_json"])) for r in store.rounds() if r["round"] > 0]
    finally:
        store.close()


def test_each_round_records_the_cumulative_epsilon_as_the_library_computes_it(tmp_path):
    # Prepare
    settings = {"noise-multiplier": 1.0, "sampling": "poisson", "fraction-train": 0.5}
    coordinator = make_coordinator(
        tmp_path, ReplyingGrid([2, 3, 4, 5], honest), strategy="clipped", **settings
    )

    # Execute
    epsilons = run_rounds(coordinator, 3)

    # Assert
    event = dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(1.0))
    assert epsilons == [pytest.approx(library_epsilon(event, k, 1e-5)) for k in (1, 2, 3)]
    assert epsilons[0] < epsilons[1] < epsilons[2]


def test_flowers_dp_wrappers_record_their_epsilon(tmp_path):
    # Prepare
    fixed = make_coordinator(
        tmp_path / "fixed",
        ReplyingGrid([2, 3, 4], honest),
        strategy="dp-fixed-clipping",
        **{"noise-multiplier": 1.5, "clip-norm": 0.5},
    )
    adaptive = make_coordinator(
        tmp_path / "adaptive",
        ReplyingGrid([2, 3, 4], honest),
        strategy="dp-adaptive-clipping",
        **{"noise-multiplier": 1.0, "dp-clipped-count-stddev": 2.0, "clip-norm": 0.5},
    )

    # Execute
    fixed_epsilons = run_rounds(fixed, 2)
    adaptive_epsilons = run_rounds(adaptive, 2)

    # Assert: fixed clipping is a Gaussian of multiplier 1.5 a round; adaptive is finite
    # and grows (its multiplier depends on how the clipping norm moved)
    gaussian = dp_event.GaussianDpEvent(1.5)
    assert fixed_epsilons == [pytest.approx(library_epsilon(gaussian, k, 1e-5)) for k in (1, 2)]
    assert 0 < adaptive_epsilons[0] < adaptive_epsilons[1] < math.inf


@pytest.mark.parametrize(
    "run_config", [{"strategy": "fedavg"}, {"strategy": "clipped", "noise-multiplier": 0.0}]
)
def test_a_run_without_noise_records_infinite_epsilon(tmp_path, run_config):
    coordinator = make_coordinator(tmp_path, ReplyingGrid([2, 3], honest), **run_config)
    assert run_rounds(coordinator, 2) == [math.inf, math.inf]


def test_the_budget_stops_before_the_round_that_would_pass_it(tmp_path):
    # Prepare: the target lies between the epsilon of round 2 and of round 3
    event = dp_event.GaussianDpEvent(2.0)
    target = (library_epsilon(event, 2, 1e-5) + library_epsilon(event, 3, 1e-5)) / 2
    coordinator = make_coordinator(
        tmp_path,
        ReplyingGrid([2, 3], honest),
        strategy="clipped",
        **{"noise-multiplier": 2.0, "target-epsilon": target, "num-server-rounds": 5},
    )

    # Execute
    with pytest.raises(PrivacyBudgetReachedError) as raised:
        coordinator.run(model())

    # Assert: two rounds ran, nothing of round 3 was sent
    assert str(raised.value).startswith(
        f"privacy budget reached: epsilon {library_epsilon(event, 2, 1e-5):.4g} at round 2; "
        "round 3 would reach"
    )
    assert len(rounds_metrics(tmp_path / "run")) == 2
    trained = [m for m in coordinator.grid.sent if m.metadata.message_type == "train"]
    assert {m.content.config_records[keys.CONFIG][keys.SERVER_ROUND] for m in trained} == {1, 2}


def start_run(tmp_path, **run_config: object) -> tuple[str, RunStore]:  # noqa: ANN001
    """Run ``run_training`` as the ServerApp does, on digits, with honest replying nodes."""
    from server.app import open_new_run, open_resumed_run

    config = parse_run_config(
        {
            "runs-dir": str(tmp_path),
            "run-name": "dp",
            "round-timeout": 5.0,
            "strategy": "clipped",
            "noise-multiplier": 1.0,
            "sampling": "poisson",
            "fraction-train": 0.5,
            "fraction-evaluate": 0.0,
            **run_config,
        }
    )
    store = open_resumed_run(config) if config.resume else open_new_run(config, "dp")
    strategy = accounted(build_strategy(config), config)
    outcome = run_training(ReplyingGrid([2, 3, 4, 5], honest), config, store, strategy)
    return outcome, store


def test_a_run_that_reaches_its_budget_ends_completed_with_the_reason(tmp_path):
    # Prepare: the target between rounds 2 and 3
    event = dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(1.0))
    target = (library_epsilon(event, 2, 1e-5) + library_epsilon(event, 3, 1e-5)) / 2

    # Execute
    outcome, store = start_run(tmp_path, **{"target-epsilon": target, "num-server-rounds": 6})

    # Assert: completed after round 2; status, event log and the closing line say why
    status = run_status(tmp_path / "dp")
    assert outcome.startswith("final accuracy: ")
    assert status["state"] == "completed" and status["current_round"] == 2
    assert str(status["message"]).startswith("privacy budget reached: epsilon ")
    assert "at round 2; round 3 would reach" in str(status["message"])
    kinds = [event["kind"] for event in store.events()]
    assert kinds[-2:] == ["privacy-budget", "completed"]


def test_a_resumed_run_continues_the_same_epsilon(tmp_path):
    # Prepare: an uninterrupted 3-round run, and one stopped after 2 rounds
    start_run(tmp_path / "whole", **{"num-server-rounds": 3})
    start_run(tmp_path / "parts", **{"num-server-rounds": 2})

    # Execute: resume the second to 3 rounds from its checkpoint
    start_run(tmp_path / "parts", **{"num-server-rounds": 3, "resume": True})

    # Assert: the same epsilon every round, and the same sampling (model hashes)
    whole = rounds_metrics(tmp_path / "whole" / "dp")
    parts = rounds_metrics(tmp_path / "parts" / "dp")
    assert [m["epsilon"] for m in parts] == [m["epsilon"] for m in whole]
    assert parts[2]["epsilon"] > parts[1]["epsilon"] > 0
    hashes = [
        [r["model_hash"] for r in RunStore(d / "dp", readonly=True).rounds()]
        for d in (tmp_path / "whole", tmp_path / "parts")
    ]
    assert hashes[0] == hashes[1]


def test_a_resume_that_changes_privacy_settings_is_refused_by_the_app_and_the_launcher(tmp_path):
    # Prepare: one round at noise 1.0
    start_run(tmp_path, **{"num-server-rounds": 1})
    changed = {"num-server-rounds": 2, "resume": True, "noise-multiplier": 0.3}

    # Execute: the ServerApp's resume, and the launcher's, with noise 0.3 and delta 0.4
    with pytest.raises(ConfigError) as refused:
        start_run(tmp_path, **changed, **{"target-delta": 0.4})
    launcher = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.launch.simulation",
            "--flwr-home",
            str(tmp_path / "flwr"),
            "--run-config",
            f"runs-dir='{tmp_path}' run-name='dp' resume=true num-server-rounds=2 "
            "strategy='clipped' noise-multiplier=0.3 sampling='poisson' fraction-train=0.5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    # Assert: refused in one line naming both values; nothing started, the run unchanged
    message = str(refused.value)
    assert "cannot change the privacy settings of run 'dp'" in message
    assert "noise-multiplier 1.0 -> 0.3" in message and "target-delta 1e-05 -> 0.4" in message
    assert launcher.returncode == 2, launcher.stdout + launcher.stderr
    assert "noise-multiplier 1.0 -> 0.3" in launcher.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "flwr").exists()
    assert [row["round"] for row in RunStore(tmp_path / "dp", readonly=True).rounds()] == [0, 1]


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"strategy": "median", "noise-multiplier": 1.0}, "no epsilon can be stated"),
        ({"strategy": "fedavg", "noise-multiplier": 0.5}, "does not add noise calibrated"),
        (
            {"strategy": "dp-fixed-clipping", "noise-multiplier": 1.0, "sampling": "poisson"},
            "Flower's DP wrappers average over the replies that arrived",
        ),
        (
            {
                "strategy": "dp-adaptive-clipping",
                "noise-multiplier": 1.0,
                "dp-clipped-count-stddev": 1.0,
                "sampling": "fixed",
            },
            "use strategy='clipped'",
        ),
        ({"strategy": "clipped", "target-epsilon": 3.0}, "target-epsilon=3 needs noise"),
        (
            {"strategy": "clipped", "noise-multiplier": 1.0, "mode": "async"},
            "cannot be accounted",
        ),
    ],
)
def test_a_configuration_that_cannot_be_accounted_is_refused_at_start(settings, message):
    # Execute / Assert: by the registry (ServerApp) and by the launcher's check
    with pytest.raises(ConfigError, match=message):
        build_strategy(parse_run_config(settings))
    text = " ".join(f"{k}={v!r}".replace("'", '"') for k, v in settings.items())
    with pytest.raises(ConfigError, match=message):
        parse_app_run_config(APP_DIR, text)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"sampling": "bernoulli"},
            "unknown sampling 'bernoulli'; valid: fraction, poisson, fixed",
        ),
        ({"target-delta": 0.0}, "target-delta must be in (0, 1)"),
        ({"target-delta": 1.0}, "target-delta must be in (0, 1)"),
        ({"target-delta": "x"}, "target-delta must be a number"),
        ({"target-epsilon": -1.0}, "target-epsilon must be >= 0"),
        ({"target-epsilon": math.inf}, "target-epsilon must be finite"),
    ],
)
def test_bad_privacy_values_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_run_config(settings)


# ---------------------------------------------------------------------------
# status, watch, export, plot and the dashboard
# ---------------------------------------------------------------------------


def run_cli(capsys, *args: object) -> tuple[int, str]:  # noqa: ANN001
    from server.ui import cli

    code = cli.main([*map(str, args)])
    return code, capsys.readouterr().out


def test_status_watch_export_plot_and_dashboard_show_epsilon(tmp_path, capsys):
    import csv
    import io
    import json

    # Prepare: a noisy run (Poisson, budget 50) and a run without noise
    start_run(tmp_path / "a", **{"num-server-rounds": 2, "target-epsilon": 50.0})
    plain = {"strategy": "fedavg", "noise-multiplier": 0.0, "sampling": "fraction"}
    start_run(tmp_path / "b", **{"num-server-rounds": 1, **plain})
    epsilons = [m["epsilon"] for m in rounds_metrics(tmp_path / "a" / "dp")]

    # Execute / Assert: status --json (strict: infinity is null, its text "inf")
    _, out = run_cli(capsys, "--runs-dir", tmp_path / "a", "status", "dp", "--json")
    privacy = json.loads(out)["privacy"]
    assert privacy["epsilon"] == pytest.approx(epsilons[-1]) and privacy["private"]
    assert (privacy["sampling"], privacy["delta"], privacy["target_epsilon"]) == (
        "poisson",
        1e-5,
        50.0,
    )
    _, out = run_cli(capsys, "--runs-dir", tmp_path / "b", "status", "dp", "--json")
    privacy = json.loads(out)["privacy"]
    assert privacy["epsilon"] is None and privacy["epsilon_text"] == "inf"
    assert not privacy["private"]

    # status (text) and the watch line
    _, out = run_cli(capsys, "--runs-dir", tmp_path / "a", "status", "dp")
    assert f"privacy    epsilon {epsilons[-1]:.2f} at delta 1e-05 (poisson sampling" in out
    assert "budget 50; sample drawn from the public seed: assumes it is hidden" in out
    _, out = run_cli(capsys, "--runs-dir", tmp_path / "b", "status", "dp")
    assert "privacy    epsilon inf: no noise, not differentially private" in out
    line = progress_line(run_status(tmp_path / "a" / "dp"))
    assert f"eps {epsilons[-1]:.2f}" in line

    # export: CSV has the column (inf for no noise), JSON lines null
    _, out = run_cli(capsys, "--runs-dir", tmp_path / "a", "export", "dp", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["epsilon"] for r in rows] == ["", *(repr(e) for e in epsilons)]
    _, out = run_cli(capsys, "--runs-dir", tmp_path / "b", "export", "dp", "--format", "csv")
    assert [r["epsilon"] for r in csv.DictReader(io.StringIO(out))] == ["", "inf"]
    _, out = run_cli(capsys, "--runs-dir", tmp_path / "b", "export", "dp", "--format", "jsonl")
    assert [json.loads(line)["epsilon"] for line in out.splitlines()] == [None, None]

    # plot: accuracy against epsilon is a fourth panel
    for run in ("a", "b"):
        target = tmp_path / f"{run}.png"
        code, _ = run_cli(capsys, "--runs-dir", tmp_path / run, "plot", "dp", "-o", target)
        assert code == 0 and target.read_bytes()[:4] == b"\x89PNG"

    # the dashboard: status, each round's epsilon and the privacy chart
    client = local_client(tmp_path / "a")
    detail = client.get("/api/runs/dp").json()
    assert detail["status"]["privacy"]["epsilon_text"] == f"{epsilons[-1]:.2f}"
    assert [r["epsilon_text"] for r in detail["rounds"]] == ["-", *(f"{e:.2f}" for e in epsilons)]
    svg = client.get("/api/runs/dp/charts/privacy.svg").text
    assert svg.startswith("<svg") and ">epsilon</text>" in svg and "no rounds yet" not in svg
    rounds = local_client(tmp_path / "b").get("/api/runs/dp").json()["rounds"]
    assert rounds[-1]["epsilon_text"] == "inf" and rounds[-1]["epsilon"] is None
    svg = local_client(tmp_path / "b").get("/api/runs/dp/charts/privacy.svg").text
    assert "epsilon = inf: no noise, not differentially private" in svg


# ---------------------------------------------------------------------------
# A real simulation
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_simulation_with_clipped_noise_and_poisson_sampling_records_a_growing_epsilon(
    simulate,
):
    # Prepare: 4 supernodes, each joins a round with probability 0.5
    settings = {
        "strategy": "clipped",
        "clip-norm": 2.0,
        "noise-multiplier": 1.0,
        "sampling": "poisson",
        "fraction-train": 0.5,
        "min-train-nodes": 1,
        "num-server-rounds": 3,
        "local-epochs": 1,
        "fraction-evaluate": 0.0,
    }

    # Execute
    run = simulate(4, "dp-sim", **settings)

    # Assert: completed; epsilon after each round as dp-accounting computes it, growing
    assert run.returncode == 0, run.output[-3000:]
    status = run.status()
    assert status["state"] == "completed" and status["current_round"] == 3
    epsilons = [m["epsilon"] for m in rounds_metrics(run.run_dir)]
    event = dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(1.0))
    assert epsilons == [pytest.approx(library_epsilon(event, k, 1e-5)) for k in (1, 2, 3)]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2] < math.inf
    assert status["privacy"]["epsilon"] == pytest.approx(epsilons[-1])
