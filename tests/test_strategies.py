"""The registry, FedCoordStrategy and FlowerStrategyAdapter, with mock reply Messages."""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import pytest
import safetensors.numpy
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvgM,
    FedTrimmedAvg,
    MultiKrum,
)

from strategies.flower_builtin import FlowerStrategyAdapter
from strategies.records import arrays_to_numpy, numpy_to_arrays, pack_arrays
from strategies.registry import (
    FLOWER_STRATEGIES,
    OWN_STRATEGIES,
    STRATEGY_NAMES,
    CoordinatedStrategy,
    build_strategy,
)
from strategies.replies import (
    aggregate_evaluate_metrics,
    check_evaluate_reply,
    compute_weighted_mean,
)
from strategies.strategy import FedCoordStrategy
from task import keys
from task.config import ConfigError, parse_run_config
from tests.helpers import NamedArrays, ReplyFn, ReplyingGrid

pytestmark = pytest.mark.usefixtures("server_identity")


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def frozen_heap() -> Iterator[None]:
    """Keep gc.collect() cheap while a test runs.

    Flower's Bulyan collects garbage for every reply it reads
    (``ArrayRecord.to_numpy_ndarrays(keep_input=False)``); each collect walked the
    whole test session's heap, about 0.2 s, and one Bulyan test took up to 8 s.
    Frozen objects are skipped; what the test itself creates is still collected.
    """
    gc.freeze()
    yield
    gc.unfreeze()


def global_arrays() -> NamedArrays:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3)).astype(np.float32),
        "fc.bias": rng.standard_normal(5).astype(np.float32),
        "bn.num_batches_tracked": np.array(10, dtype=np.int64),
    }


def client_arrays(base: Mapping[str, np.ndarray], node_id: int, scale: float = 0.1) -> NamedArrays:
    """``base`` plus a node-specific update; the counter advances by 4."""
    rng = np.random.default_rng(100 + node_id)
    return {
        name: (
            (value + scale * rng.standard_normal(value.shape)).astype(value.dtype)
            if value.dtype.kind == "f"
            else np.asarray(value + 4)
        )
        for name, value in base.items()
    }


def make_reply(
    arrays: Mapping[str, np.ndarray],
    node_id: int,
    num_examples: object = 10,
    extra_metrics: Mapping[str, float] | None = None,
    packed: bool = False,
) -> Message:
    """A train reply from ``node_id``, built as a ClientApp builds it."""
    instruction = Message(RecordDict(), node_id, "train")
    metrics = {
        keys.NUM_EXAMPLES: num_examples,
        keys.PARTITION_ID: node_id - 2,
        keys.TRAIN_LOSS: 0.5,
        **(extra_metrics or {}),
    }
    content = RecordDict(
        {
            keys.ARRAYS: pack_arrays(arrays) if packed else numpy_to_arrays(arrays),
            keys.METRICS: MetricRecord(metrics),
        }
    )
    return Message(content=content, reply_to=instruction)


def honest_replies(base: Mapping[str, np.ndarray], count: int, first_node: int = 2) -> list:
    return [
        make_reply(client_arrays(base, node), node, num_examples=10 * node)
        for node in range(first_node, first_node + count)
    ]


def build(name: str, **run_config: object) -> CoordinatedStrategy:
    return build_strategy(parse_run_config({"strategy": name, **run_config}))


def needed_config(name: str) -> dict[str, object]:
    """Run-config keys a strategy needs beyond the defaults, for these tests."""
    if name == "fedprox":
        return {"proximal-mu": 0.01}
    if name in ("fedadam", "fedyogi", "fedadagrad"):
        return {"server-lr": 0.01}
    return {}


def run_round(
    strategy: CoordinatedStrategy,
    server_round: int,
    base: Mapping[str, np.ndarray],
    replies: Iterable[Message],
):  # noqa: ANN201
    strategy.begin_round(server_round, base)
    outcomes = [strategy.add_reply(reply) for reply in replies]
    new_global, summary = strategy.end_round()
    return new_global, summary, outcomes


def snapshot(arrays: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    return {name: np.ascontiguousarray(a).tobytes() for name, a in arrays.items()}


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_name_builds(name):
    # Execute
    strategy = build(name, **needed_config(name))

    # Assert
    expected = FedCoordStrategy if name in OWN_STRATEGIES else FlowerStrategyAdapter
    assert isinstance(strategy, expected)


def test_spec_names_and_flower_builtins_are_all_registered():
    # Assert
    spec = {"mean", "weighted", "fedavg", "clipped", "median", "trimmed-mean", "krum"}
    flower = {"fedprox", "fedadam", "fedyogi", "fedavgm", "fedadagrad", "fedmedian"}
    flower |= {"fedtrimmedavg", "multikrum", "bulyan", "dp-fixed-clipping", "dp-adaptive-clipping"}
    assert set(STRATEGY_NAMES) == spec | flower
    assert len(STRATEGY_NAMES) == len(set(STRATEGY_NAMES))


def test_unknown_strategy_lists_every_valid_name():
    # Execute
    with pytest.raises(ConfigError) as error:
        build("fedsgd")

    # Assert
    assert "unknown strategy 'fedsgd'; valid: " + ", ".join(STRATEGY_NAMES) in str(error.value)


def test_fedprox_without_proximal_mu_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"proximal-mu > 0.*proximal-mu=0\.01"):
        build("fedprox")


def test_dp_adaptive_clipping_with_noise_needs_a_clipped_count_stddev():
    # Execute / Assert
    with pytest.raises(ConfigError, match="dp-clipped-count-stddev > 0.5"):
        build("dp-adaptive-clipping", **{"noise-multiplier": 1.0})
    strategy = build(
        "dp-adaptive-clipping", **{"noise-multiplier": 1.0, "dp-clipped-count-stddev": 1.0}
    )
    assert isinstance(strategy, FlowerStrategyAdapter)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("trim-beta", 0.5, "trim-beta must be in [0, 0.5)"),
        ("num-malicious", -1, "num-malicious must be >= 0"),
        ("num-selected", 0, "num-selected must be >= 1"),
        ("server-momentum", 1.0, "server-momentum must be in [0, 1)"),
        ("fedopt-beta1", -0.1, "fedopt-beta1 must be in [0, 1)"),
        ("fedopt-beta2", 1.5, "fedopt-beta2 must be in [0, 1)"),
        ("fedopt-tau", 0.0, "fedopt-tau must be > 0"),
        ("dp-clipped-count-stddev", -1.0, "dp-clipped-count-stddev must be >= 0"),
    ],
)
def test_bad_strategy_parameters_are_refused_at_start(key, value, named):
    with pytest.raises(ConfigError) as error:
        parse_run_config({key: value})
    assert named in str(error.value)


def test_own_strategy_options_come_from_run_config():
    # Execute
    krum = build("krum", **{"num-malicious": 2, "num-selected": 3})
    trimmed = build("trimmed-mean", **{"trim-beta": 0.2})
    clipped = build("clipped", **{"clip-norm": 3.0, "noise-multiplier": 0.5, "seed": 9})

    # Assert
    assert krum.aggregator_options == {"num_malicious": 2, "num_selected": 3}
    assert trimmed.aggregator_options == {"beta": 0.2}
    assert clipped.aggregator_options == {"clip_norm": 3.0, "noise_multiplier": 0.5, "seed": 9}


def test_flower_parameters_come_from_run_config():
    # Execute
    adam = build(
        "fedadam",
        **{"server-lr": 0.02, "fedopt-beta1": 0.8, "fedopt-beta2": 0.95, "fedopt-tau": 0.01},
    )
    avgm = build("fedavgm", **{"server-lr": 0.5, "server-momentum": 0.7})
    trimmed = build("fedtrimmedavg", **{"trim-beta": 0.3})
    multikrum = build("multikrum", **{"num-malicious": 1, "num-selected": 2})
    dp = build("dp-fixed-clipping", **{"clip-norm": 2.0, "noise-multiplier": 0.3})

    # Assert
    assert isinstance(adam, FlowerStrategyAdapter) and isinstance(adam.strategy, FedAdam)
    assert (adam.strategy.eta, adam.strategy.beta_1, adam.strategy.beta_2) == (0.02, 0.8, 0.95)
    assert adam.strategy.tau == 0.01 and adam.server_lr == 1.0  # eta is the server step
    assert isinstance(avgm, FlowerStrategyAdapter) and isinstance(avgm.strategy, FedAvgM)
    assert (avgm.strategy.server_learning_rate, avgm.strategy.server_momentum) == (0.5, 0.7)
    assert isinstance(trimmed, FlowerStrategyAdapter)
    assert isinstance(trimmed.strategy, FedTrimmedAvg) and trimmed.strategy.beta == 0.3
    assert isinstance(multikrum, FlowerStrategyAdapter)
    assert isinstance(multikrum.strategy, MultiKrum)
    assert multikrum.strategy.num_malicious_nodes == 1
    assert multikrum.strategy.num_nodes_to_select == 2
    assert isinstance(dp, FlowerStrategyAdapter)
    assert isinstance(dp.strategy, DifferentialPrivacyServerSideFixedClipping)
    assert (dp.strategy.clipping_norm, dp.strategy.noise_multiplier) == (2.0, 0.3)


# ---------------------------------------------------------------------------
# Flower built-ins under the adapter
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FLOWER_STRATEGIES)
def test_every_flower_strategy_aggregates_mock_replies(name):
    # Prepare
    base = global_arrays()
    strategy = build(name, **needed_config(name))

    # Execute
    new_global, summary, outcomes = run_round(strategy, 1, base, honest_replies(base, 7))

    # Assert: a new model with the global's names, shapes and dtypes, all finite
    assert all(o.accepted for o in outcomes)
    assert new_global is not None, summary.reason
    assert summary.updated and summary.accepted == 7 and summary.rejected == 0
    assert list(new_global) == list(base)
    for name_, value in new_global.items():
        assert value.shape == base[name_].shape and value.dtype == base[name_].dtype
        assert np.isfinite(value).all()
    assert not np.array_equal(new_global["conv.weight"], base["conv.weight"])
    assert summary.metrics[keys.TRAIN_LOSS] == pytest.approx(0.5)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_packed_replies_aggregate_exactly_like_named_ones(name):
    # Prepare: the coordinator sends packed records and our ClientApp answers packed
    base = global_arrays()
    clients = {node: client_arrays(base, node) for node in range(2, 9)}
    results = []

    # Execute
    for packed in (False, True):
        np.random.seed(0)  # the DP strategies draw their noise from numpy's global RNG
        replies = [make_reply(a, n, 10 * n, packed=packed) for n, a in clients.items()]
        strategy = build(name, **needed_config(name))
        results.append(run_round(strategy, 1, base, replies))

    # Assert
    (named, named_summary, _), (packed_global, packed_summary, outcomes) = results
    assert all(o.accepted for o in outcomes)
    assert packed_summary.accepted == named_summary.accepted == 7
    assert named is not None and packed_global is not None
    assert snapshot(packed_global) == snapshot(named)


def test_malformed_packed_reply_is_rejected_with_its_reason():
    # Prepare: a packed reply whose data is one byte short
    base = global_arrays()
    good = pack_arrays(client_arrays(base, 2))
    data = arrays_to_numpy(ArrayRecord({"x": good["fedcoord.packed"]}))["x"]
    short = ArrayRecord(
        {"fedcoord.packed": Array(np.array(data[:-1])), "fedcoord.layout": good["fedcoord.layout"]}
    )
    instruction = Message(RecordDict(), 2, "train")
    metrics = MetricRecord({keys.NUM_EXAMPLES: 10, keys.PARTITION_ID: 0})
    reply = Message(RecordDict({keys.ARRAYS: short, keys.METRICS: metrics}), reply_to=instruction)
    strategy = build("fedavg")

    # Execute
    new_global, summary, outcomes = run_round(strategy, 1, base, [reply])

    # Assert
    assert not outcomes[0].accepted
    assert outcomes[0].reason.startswith("malformed arrays: packed data ends inside array")
    assert new_global is None and summary.rejected == 1


def test_reply_array_that_is_not_npy_bytes_is_rejected_not_raised():
    # Prepare: one array's bytes are not a .npy payload
    base = global_arrays()
    record = numpy_to_arrays(client_arrays(base, 2))
    record["fc.bias"] = Array(dtype="float32", shape=(5,), stype="numpy.ndarray", data=b"junk")
    instruction = Message(RecordDict(), 2, "train")
    metrics = MetricRecord({keys.NUM_EXAMPLES: 10, keys.PARTITION_ID: 0})
    reply = Message(RecordDict({keys.ARRAYS: record, keys.METRICS: metrics}), reply_to=instruction)

    # Execute
    _, summary, outcomes = run_round(build("fedavg"), 1, base, [reply])

    # Assert
    assert not outcomes[0].accepted and outcomes[0].reason.startswith("malformed arrays: ")
    assert summary.rejected == 1


def test_adapter_matches_the_weighted_average_and_our_fedavg():
    # Prepare: fedprox aggregates like FedAvg (the proximal term is the clients')
    base = global_arrays()
    replies = honest_replies(base, 4)
    weights = [10 * node for node in range(2, 6)]
    clients = [client_arrays(base, node) for node in range(2, 6)]

    # Execute
    flower, _, _ = run_round(build("fedprox", **{"proximal-mu": 0.1}), 1, base, replies)
    ours, _, _ = run_round(build("fedavg"), 1, base, replies)

    # Assert
    assert flower is not None and ours is not None
    for name in ("conv.weight", "fc.bias"):
        oracle = np.average([c[name] for c in clients], axis=0, weights=weights)
        np.testing.assert_allclose(flower[name], oracle, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours[name], oracle, rtol=1e-5, atol=1e-6)
    assert flower["bn.num_batches_tracked"] == 14 and ours["bn.num_batches_tracked"] == 14


def malformed_replies(base: Mapping[str, np.ndarray]) -> list[Message]:
    """Replies from nodes 3..6 that validation must reject."""
    nan = client_arrays(base, 3)
    nan["fc.bias"][0] = np.nan
    missing = {k: v for k, v in client_arrays(base, 4).items() if k != "fc.bias"}
    wrong_dtype = client_arrays(base, 5)
    wrong_dtype["conv.weight"] = wrong_dtype["conv.weight"].astype(np.float64)
    return [
        make_reply(nan, 3),
        make_reply(missing, 4),
        make_reply(wrong_dtype, 5),
        make_reply(client_arrays(base, 6), 6, num_examples=0),
    ]


@pytest.mark.parametrize("name", ["fedmedian", "fedadam", "dp-fixed-clipping", "multikrum"])
def test_malformed_reply_is_rejected_and_the_global_model_stays_bit_identical(name):
    # Prepare: one good reply, four malformed ones, and a duplicate of the good one
    base = global_arrays()
    before = snapshot(base)
    good = make_reply(client_arrays(base, 2), 2)
    replies = [good, *malformed_replies(base), make_reply(client_arrays(base, 7), 2)]
    strategy = build(name, **needed_config(name))

    # Execute
    new_global, summary, outcomes = run_round(strategy, 1, base, replies)

    # Assert: every bad reply is rejected with its reason; one accepted < min-train-nodes=2
    assert [o.accepted for o in outcomes] == [True, False, False, False, False, False]
    reasons = [o.reason for o in outcomes[1:]]
    assert "'fc.bias' holds NaN" in reasons[0]
    assert "missing arrays: 'fc.bias'" in reasons[1]
    assert "dtype float64, expected float32" in reasons[2]
    assert "num-examples must be >= 1, got 0" in reasons[3]
    assert "duplicate reply from node 2" in reasons[4]
    assert new_global is None and not summary.updated
    assert "fewer than min-train-nodes=2: global model kept" in summary.reason
    assert (summary.accepted, summary.rejected) == (1, 5)
    assert snapshot(base) == before


@pytest.mark.parametrize("name", ["fedmedian", "fedavgm", "bulyan", "dp-adaptive-clipping"])
def test_malformed_replies_never_reach_the_flower_strategy(name):
    # Prepare
    base = global_arrays()
    good = honest_replies(base, 5, first_node=10)

    # Execute: the same good replies, with and without malformed ones mixed in
    clean, _, _ = run_round(build(name, **needed_config(name)), 1, base, good)
    mixed_replies = [*good[:2], *malformed_replies(base), *good[2:]]
    mixed, summary, _ = run_round(build(name, **needed_config(name)), 1, base, mixed_replies)

    # Assert
    assert clean is not None and mixed is not None
    assert (summary.accepted, summary.rejected) == (5, 4)
    for array_name in base:
        np.testing.assert_array_equal(mixed[array_name], clean[array_name])


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "bulyan", "dp-fixed-clipping"])
def test_flower_strategies_leave_the_coordinators_replies_untouched(name):
    # Prepare: these Flower strategies pop or replace the arrays of the replies they get
    base = global_arrays()
    replies = honest_replies(base, 5)
    before = [snapshot(arrays_to_numpy(r.content.array_records[keys.ARRAYS])) for r in replies]

    # Execute
    run_round(build(name), 1, base, replies)

    # Assert
    after = [snapshot(arrays_to_numpy(r.content.array_records[keys.ARRAYS])) for r in replies]
    assert after == before


def test_replies_with_different_extra_metrics_do_not_stop_flower_aggregation():
    # Prepare: Flower's FedAvg raises InconsistentMessageReplies on differing metric keys
    base = global_arrays()
    replies = honest_replies(base, 3)
    replies.append(make_reply(client_arrays(base, 9), 9, extra_metrics={"train-seconds": 1.0}))

    # Execute
    new_global, summary, _ = run_round(build("dp-fixed-clipping"), 1, base, replies)

    # Assert
    assert new_global is not None and summary.accepted == 4
    assert "train-seconds" not in summary.metrics


def test_bulyan_with_too_few_replies_keeps_the_global_model():
    # Prepare: Bulyan needs 4f + 3 = 7 replies for f = 1
    base = global_arrays()
    strategy = build("bulyan", **{"num-malicious": 1})

    # Execute
    new_global, summary, _ = run_round(strategy, 1, base, honest_replies(base, 5))

    # Assert
    assert new_global is None and not summary.updated
    assert "bulyan could not aggregate: it returned no arrays" in summary.reason


def test_fedadam_step_is_cast_back_to_the_model_dtypes():
    # Prepare: FedAdam's bias-corrected step is a float64 scalar
    base = global_arrays()

    # Execute
    new_global, _, _ = run_round(
        build("fedadam", **{"server-lr": 0.01}), 1, base, honest_replies(base, 3)
    )

    # Assert
    assert new_global is not None
    assert {k: v.dtype for k, v in new_global.items()} == {k: v.dtype for k, v in base.items()}


def test_server_lr_scales_the_step_of_flower_aggregates():
    # Prepare
    base = global_arrays()
    replies = honest_replies(base, 5)

    # Execute
    full, _, _ = run_round(build("fedmedian"), 1, base, replies)
    half, _, _ = run_round(build("fedmedian", **{"server-lr": 0.5}), 1, base, replies)

    # Assert
    assert full is not None and half is not None
    expected = base["fc.bias"] + 0.5 * (full["fc.bias"] - base["fc.bias"])
    np.testing.assert_allclose(half["fc.bias"], expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# Strategy state for checkpoints
# ---------------------------------------------------------------------------


def checkpoint_round_trip(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state as a checkpoint stores it: safetensors bytes and back."""
    return safetensors.numpy.load(safetensors.numpy.save(dict(state)))


def two_rounds(strategy: CoordinatedStrategy, base: NamedArrays) -> tuple[NamedArrays, ...]:
    first, _, _ = run_round(strategy, 1, base, honest_replies(base, 5))
    assert first is not None
    second, _, _ = run_round(strategy, 2, first, honest_replies(first, 5, first_node=3))
    assert second is not None
    return first, second


@pytest.mark.parametrize(
    ("name", "state_keys"),
    [
        ("fedadam", {"fedopt/m_t/conv.weight", "fedopt/v_t/fc.bias"}),
        ("fedyogi", {"fedopt/m_t/fc.bias", "fedopt/v_t/conv.weight"}),
        ("fedadagrad", {"fedopt/v_t/conv.weight"}),
        ("fedavgm", {"fedavgm/momentum/0000", "fedavgm/momentum/0002"}),
        ("dp-adaptive-clipping", {"dp/clipping-norm"}),
        ("weighted", {"operator-weights"}),
        ("krum", set()),
    ],
)
def test_restored_state_continues_exactly_like_an_uninterrupted_run(name, state_keys):
    # Prepare: an uninterrupted run of two rounds, and one stopped after round 1
    base = global_arrays()
    config = {**needed_config(name), "node-weights": "1=2.0", "clip-norm": 0.2}
    _, expected = two_rounds(build(name, **config), base)
    stopped = build(name, **config)
    first, _, _ = run_round(stopped, 1, base, honest_replies(base, 5))
    assert first is not None

    # Execute: a fresh strategy restored from the checkpointed state runs round 2
    state = checkpoint_round_trip(stopped.state_dict())
    restored = build(name, **config)
    restored.load_state_dict(state)
    second, _, _ = run_round(restored, 2, first, honest_replies(first, 5, first_node=3))

    # Assert: the state holds what matters, and round 2 is bit-identical
    assert state_keys <= set(state) and "sampler/rng" in state
    assert second is not None
    for array_name in base:
        np.testing.assert_array_equal(second[array_name], expected[array_name])


@pytest.mark.parametrize("name", ["fedavg", "fedmedian"])
def test_restored_sampler_draws_the_nodes_the_uninterrupted_one_draws(name):
    # Prepare
    original = build(name)
    original.sample_nodes(range(2, 30), 0.3, 2)
    state = checkpoint_round_trip(original.state_dict())
    expected = [original.sample_nodes(range(2, 30), 0.3, 2) for _ in range(3)]

    # Execute
    restored = build(name)
    restored.load_state_dict(state)

    # Assert
    assert [restored.sample_nodes(range(2, 30), 0.3, 2) for _ in range(3)] == expected
    assert len(expected[0]) == 9


def test_fedadam_moments_survive_a_state_dict_round_trip():
    # Prepare
    base = global_arrays()
    original = build("fedadam", **{"server-lr": 0.01})
    two_rounds(original, base)
    assert isinstance(original, FlowerStrategyAdapter)
    adam = original.strategy
    assert isinstance(adam, FedAdam) and adam.m_t and adam.v_t

    # Execute
    restored = build("fedadam", **{"server-lr": 0.01})
    restored.load_state_dict(checkpoint_round_trip(original.state_dict()))

    # Assert
    assert isinstance(restored, FlowerStrategyAdapter) and isinstance(restored.strategy, FedAdam)
    assert restored.strategy.m_t is not None and restored.strategy.v_t is not None
    for moments, saved in ((restored.strategy.m_t, adam.m_t), (restored.strategy.v_t, adam.v_t)):
        assert set(moments) == set(saved)
        for name, value in saved.items():
            np.testing.assert_array_equal(moments[name], value)
            assert moments[name].dtype == value.dtype


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_state_of_another_strategy_is_refused(name):
    # Prepare
    other = build("fedavgm")
    base = global_arrays()
    two_rounds(other, base)

    # Execute / Assert
    with pytest.raises(ValueError, match="unexpected strategy state keys"):
        build(name, **needed_config(name)).load_state_dict(other.state_dict())


def test_operator_weight_changes_the_next_round_and_is_checkpointed():
    # Prepare: node 2 is partition 0, node 3 partition 1
    base = global_arrays()
    replies = [make_reply(client_arrays(base, n), n) for n in (2, 3)]
    strategy = build("weighted")
    equal, _, _ = run_round(strategy, 1, base, replies)

    # Execute
    strategy.set_operator_weight(1, 3.0)
    weighted, _, _ = run_round(strategy, 2, base, replies)
    restored = build("weighted")
    restored.load_state_dict(strategy.state_dict())

    # Assert
    assert equal is not None and weighted is not None
    clients = [client_arrays(base, n)["fc.bias"] for n in (2, 3)]
    np.testing.assert_allclose(equal["fc.bias"], np.mean(clients, axis=0), rtol=1e-5)
    oracle = np.average(clients, axis=0, weights=[1.0, 3.0])
    np.testing.assert_allclose(weighted["fc.bias"], oracle, rtol=1e-5)
    assert isinstance(restored, FedCoordStrategy)
    assert restored.state_dict()["operator-weights"].tolist() == [[1.0, 3.0]]


# ---------------------------------------------------------------------------
# FedCoordStrategy: zero-copy replies, reused buffers
# ---------------------------------------------------------------------------


def test_reply_arrays_are_read_only_views_that_are_never_written():
    # Prepare
    base = global_arrays()
    replies = honest_replies(base, 3)
    before = [snapshot(arrays_to_numpy(r.content.array_records[keys.ARRAYS])) for r in replies]

    # Execute
    views = arrays_to_numpy(replies[0].content.array_records[keys.ARRAYS])
    run_round(build("clipped"), 1, base, replies)

    # Assert
    assert all(not view.flags.writeable for view in views.values())
    after = [snapshot(arrays_to_numpy(r.content.array_records[keys.ARRAYS])) for r in replies]
    assert after == before


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum"])
def test_robust_aggregators_copy_updates_out_of_the_reused_buffer(name):
    # Prepare: Krum f = 0, m = 5 averages everything, like trimmed-mean with beta 0
    base = global_arrays()
    config = {"trim-beta": 0.0, "num-selected": 5}
    clients = [client_arrays(base, n) for n in range(2, 7)]

    # Execute
    new_global, _, _ = run_round(build(name, **config), 1, base, honest_replies(base, 5))

    # Assert: the oracle sees every update, so a buffer aliased across replies would show
    assert new_global is not None
    updates = np.stack([c["conv.weight"] - base["conv.weight"] for c in clients])
    reduce = np.median if name == "median" else np.mean
    oracle = base["conv.weight"] + reduce(updates, axis=0)
    np.testing.assert_allclose(new_global["conv.weight"], oracle, rtol=1e-5, atol=1e-6)


def test_0d_arrays_keep_their_shape_through_records():
    # Prepare
    arrays = {"count": np.array(3, dtype=np.int64), "w": np.ones((2, 2), dtype=np.float32)}

    # Execute
    again = arrays_to_numpy(numpy_to_arrays(arrays))

    # Assert
    assert again["count"].shape == () and again["count"] == 3
    assert again["w"].shape == (2, 2)


def test_krum_with_too_few_updates_keeps_the_global_model():
    # Prepare: Krum tolerating f = 2 needs 2f + 3 = 7 updates
    base = global_arrays()

    # Execute
    new_global, summary, _ = run_round(
        build("krum", **{"num-malicious": 2}), 1, base, honest_replies(base, 5)
    )

    # Assert
    assert new_global is None and not summary.updated
    assert "krum could not aggregate: krum needs n >= 2f + 3" in summary.reason


# ---------------------------------------------------------------------------
# FedCoordStrategy under Flower's own Strategy.start()
# ---------------------------------------------------------------------------


def trained_by(train_fn: Callable[[int, NamedArrays], NamedArrays]) -> ReplyFn:
    """Nodes that answer train messages with ``train_fn``'s arrays and evaluate ones at once."""

    def reply(node_id: int, message_type: str, received: NamedArrays) -> RecordDict:
        if message_type == "train":
            return RecordDict(
                {
                    keys.ARRAYS: numpy_to_arrays(train_fn(node_id, received)),
                    keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 1.0}),
                }
            )
        metrics = {keys.NUM_EXAMPLES: 5, keys.EVAL_ACCURACY: 0.5}
        return RecordDict({keys.METRICS: MetricRecord(metrics)})

    return reply


def test_fedcoord_strategy_runs_under_flowers_start():
    # Prepare: every node adds 1.0 to every float value; node 4 sends a NaN
    base = global_arrays()

    def train(node_id: int, received: NamedArrays) -> NamedArrays:
        arrays = {k: np.array(v) + (1 if v.dtype.kind == "f" else 0) for k, v in received.items()}
        if node_id == 4:
            arrays["fc.bias"][0] = np.nan
        return arrays

    grid = ReplyingGrid([2, 3, 4], trained_by(train))
    strategy = build("fedavg")
    assert isinstance(strategy, FedCoordStrategy)

    # Execute
    result = strategy.start(grid, numpy_to_arrays(base), num_rounds=2)

    # Assert: two rounds of +1 from the two good nodes; the NaN never got in
    final = arrays_to_numpy(result.arrays)
    np.testing.assert_allclose(final["fc.bias"], base["fc.bias"] + 2.0, rtol=1e-6)
    assert final["bn.num_batches_tracked"] == 10
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert result.evaluate_metrics_clientapp[2][keys.EVAL_ACCURACY] == pytest.approx(0.5)
    train_messages = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train_messages) == 6
    config = train_messages[-1].content.config_records[keys.CONFIG]
    assert config[keys.SERVER_ROUND] == 2


def test_flower_strategy_state_is_deep_copied_by_state_dict():
    # Prepare: the checkpoint must not change when the strategy keeps training
    base = global_arrays()
    strategy = build("fedadam", **{"server-lr": 0.01})
    first, _, _ = run_round(strategy, 1, base, honest_replies(base, 3))
    state = copy.deepcopy(strategy.state_dict())
    saved = strategy.state_dict()

    # Execute
    assert first is not None
    run_round(strategy, 2, first, honest_replies(first, 3))

    # Assert
    assert state
    for key, value in state.items():
        np.testing.assert_array_equal(saved[key], value)


# ---------------------------------------------------------------------------
# Hostile replies and overflowing numbers
# ---------------------------------------------------------------------------


def huge_replies(base: Mapping[str, np.ndarray], count: int) -> list[Message]:
    """Finite replies whose float32 values sum past float32's largest value."""
    largest = np.finfo(np.float32).max
    replies = []
    for node in range(2, 2 + count):
        arrays = {
            name: np.full_like(value, largest) if value.dtype.kind == "f" else value
            for name, value in base.items()
        }
        replies.append(make_reply(arrays, node))
    return replies


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fedavg", {}),
        ("mean", {}),
        ("weighted", {}),
        ("fedavgm", {"server-lr": 10.0}),
        ("fedprox", {"proximal-mu": 0.01, "server-lr": 10.0}),
    ],
)
def test_a_new_global_model_that_is_not_finite_is_never_accepted(name, options):
    # Prepare: every reply is finite and accepted; their sum, or the server step, is not
    base = global_arrays()
    before = snapshot(base)
    strategy = build(name, **options)

    # Execute
    new_global, summary, outcomes = run_round(strategy, 1, base, huge_replies(base, 3))

    # Assert: the round keeps the previous model and says why
    assert len(outcomes) == 3 and all(o.accepted for o in outcomes)
    assert new_global is None and not summary.updated
    assert "not finite" in summary.reason and "global model kept" in summary.reason
    assert snapshot(base) == before


def test_a_kept_round_restores_the_flower_strategys_state():
    # Prepare: one good round sets FedAvgM's momentum
    base = global_arrays()
    strategy = build("fedavgm", **{"server-lr": 10.0})
    after_one, _, _ = run_round(strategy, 1, base, honest_replies(base, 3))
    assert after_one is not None
    moments = {k: v.copy() for k, v in strategy.state_dict().items()}

    # Execute: a round whose aggregate overflows
    kept, summary, _ = run_round(strategy, 2, after_one, huge_replies(after_one, 3))

    # Assert: the momentum is that of round 1, still finite
    assert kept is None and "not finite" in summary.reason
    state = strategy.state_dict()
    assert moments and set(state) == set(moments)
    for key, value in moments.items():
        np.testing.assert_array_equal(state[key], value)


def test_an_update_whose_weight_cannot_be_folded_is_rejected_not_raised():
    # Prepare: a weight function that yields NaN for node 3
    base = global_arrays()

    def weight_fn(node_id: int, num_examples: int, metrics: Mapping[str, float]) -> float:
        return float("nan") if node_id == 3 else 1.0

    strategy = FedCoordStrategy("weighted", weight_fn=weight_fn)

    # Execute
    new_global, summary, outcomes = run_round(strategy, 1, base, honest_replies(base, 3))

    # Assert
    assert [o.accepted for o in outcomes] == [True, False, True]
    assert outcomes[1].reason.startswith("update could not be aggregated: weight must be finite")
    assert new_global is not None and (summary.accepted, summary.rejected) == (2, 1)


class ExplodingFloat(float):
    """A metric value that passes type checks and raises when compared."""

    def __ge__(self, other: object) -> bool:
        raise RuntimeError("comparison exploded")

    __le__ = __ge__


@pytest.mark.parametrize("name", ["fedavg", "fedmedian"])
def test_any_exception_while_reading_one_reply_rejects_that_reply_only(name):
    # Prepare: a reply whose metric raises an unexpected exception when checked
    base = global_arrays()
    bad = make_reply(client_arrays(base, 9), 9)
    bad.content.metric_records[keys.METRICS].__dict__["_data"][keys.TRAIN_LOSS] = ExplodingFloat(
        0.5
    )
    replies = [*honest_replies(base, 2), bad]

    # Execute
    new_global, summary, outcomes = run_round(strategy := build(name), 1, base, replies)

    # Assert: rejected with the exception named; the round aggregates the others
    assert outcomes[2].reason == "reply could not be read: RuntimeError: comparison exploded"
    assert new_global is not None and (summary.accepted, summary.rejected) == (2, 1)
    assert strategy is not None


def test_evaluate_replies_are_checked_and_only_accepted_ones_are_averaged():
    # Prepare
    instruction = Message(RecordDict(), 2, "evaluate")

    def evaluate_reply(**metrics: object) -> Message:
        return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=instruction)

    good = [
        evaluate_reply(**{"num-examples": 10, "eval-loss": 0.2, "eval-accuracy": 0.9}),
        evaluate_reply(**{"num-examples": 30, "eval-loss": 0.6, "eval-accuracy": 0.5}),
    ]
    bad = [
        evaluate_reply(**{"num-examples": 10**6, "eval-loss": 1e300, "eval-accuracy": 7.0}),
        evaluate_reply(**{"num-examples": 1e19, "eval-loss": 0.1, "eval-accuracy": 0.1}),
        Message(RecordDict(), reply_to=instruction),
    ]

    # Execute
    outcomes = [check_evaluate_reply(reply) for reply in [*good, *bad]]
    averaged = aggregate_evaluate_metrics([o.metrics for o in outcomes if o.accepted])

    # Assert
    assert [o.accepted for o in outcomes] == [True, True, False, False, False]
    assert "metric 'eval-accuracy' 7.0 is outside [0, 1]" in outcomes[2].reason
    assert "num-examples 1e+19 exceeds" in outcomes[3].reason
    assert outcomes[4].reason == "evaluate reply carries no metrics"
    assert averaged[keys.EVAL_ACCURACY] == pytest.approx((0.9 * 10 + 0.5 * 30) / 40)
    assert averaged[keys.NUM_EXAMPLES] == 40.0


def test_weighted_metric_means_of_huge_values_stay_finite():
    # Execute
    mean = compute_weighted_mean([1.7e308, 1.7e308], [2.0**53, 2.0**53])

    # Assert
    assert mean == 1.7e308
