"""Tests of strategies.validation: every malformed reply is rejected with a reason."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from strategies.replies import RoundReplyTracker
from strategies.validation import (
    ArraySpec,
    find_evaluate_problem,
    ordered_arrays,
    specs_from_arrays,
    validate_reply,
)


@dataclass
class RejectionLog:
    """Rejected replies: how many per node, and every reason in arrival order."""

    counts: dict[int, int] = field(default_factory=dict)
    reasons: list[tuple[int, str]] = field(default_factory=list)

    def record(self, node_id: int, reason: str) -> None:
        """Count one rejected reply from ``node_id`` with its reason."""
        self.counts[node_id] = self.counts.get(node_id, 0) + 1
        self.reasons.append((node_id, reason))

    @property
    def total(self) -> int:
        """Number of rejected replies recorded."""
        return len(self.reasons)


def global_arrays() -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.zeros((4, 1, 3, 3), dtype=np.float32),
        "conv.bias": np.zeros(4, dtype=np.float32),
        "bn.num_batches_tracked": np.array(0, dtype=np.int64),
    }


def good_reply() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "bn.num_batches_tracked": np.array(12, dtype=np.int64),
    }


EXPECTED = specs_from_arrays(global_arrays())
GOOD_METRICS: dict[str, object] = {"train_loss": 0.25, "num-examples": 32}


def test_specs_from_arrays_records_shape_and_dtype() -> None:
    # Execute
    specs = specs_from_arrays(global_arrays())

    # Assert
    assert list(specs) == ["conv.weight", "conv.bias", "bn.num_batches_tracked"]
    assert specs["conv.weight"] == ArraySpec((4, 1, 3, 3), np.dtype(np.float32))
    assert specs["bn.num_batches_tracked"] == ArraySpec((), np.dtype(np.int64))


@pytest.mark.parametrize(
    "num_examples", [1, 32, np.int64(32), np.int32(5), 3.0, np.float32(7.0), 10**12]
)
def test_good_reply_is_accepted(num_examples: object) -> None:
    # Execute
    reason = validate_reply(good_reply(), num_examples, GOOD_METRICS, EXPECTED)

    # Assert
    assert reason is None


@pytest.mark.parametrize("metrics", [None, {}, {"acc": np.float32(0.5), "steps": np.int64(3)}])
def test_missing_or_numpy_scalar_metrics_are_accepted(metrics: dict[str, object] | None) -> None:
    # Execute
    reason = validate_reply(good_reply(), 32, metrics, EXPECTED)

    # Assert
    assert reason is None


def test_huge_but_finite_values_are_accepted() -> None:
    # Prepare: their squares overflow float32, which must not read as "non-finite"
    arrays = good_reply()
    arrays["conv.bias"] = np.full(4, 3e38, dtype=np.float32)

    # Execute
    reason = validate_reply(arrays, 32, GOOD_METRICS, EXPECTED)

    # Assert
    assert reason is None


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["conv.weight", "conv.bias"])
def test_non_finite_value_is_rejected_naming_the_array(bad_value: float, name: str) -> None:
    # Prepare
    arrays = good_reply()
    arrays[name].flat[-1] = bad_value

    # Execute
    reason = validate_reply(arrays, 32, GOOD_METRICS, EXPECTED)

    # Assert
    assert reason is not None
    assert repr(name) in reason
    assert "NaN or infinite" in reason


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.complex64])
def test_non_finite_value_is_rejected_for_other_float_dtypes(dtype: type) -> None:
    # Prepare
    arrays = {"w": np.array([1.0, np.nan, 2.0], dtype=dtype)}
    expected = specs_from_arrays({"w": np.zeros(3, dtype=dtype)})

    # Execute
    reason = validate_reply(arrays, 32, None, expected)

    # Assert
    assert reason == "array 'w' holds NaN or infinite values"


def test_wrong_shape_is_rejected_naming_the_array() -> None:
    # Prepare
    arrays = good_reply()
    arrays["conv.bias"] = np.zeros(5, dtype=np.float32)

    # Execute
    reason = validate_reply(arrays, 32, GOOD_METRICS, EXPECTED)

    # Assert
    assert reason == "array 'conv.bias' has shape (5,), expected (4,)"


def test_wrong_dtype_is_rejected_naming_the_array() -> None:
    # Prepare
    arrays = good_reply()
    arrays["conv.weight"] = arrays["conv.weight"].astype(np.float64)

    # Execute
    reason = validate_reply(arrays, 32, GOOD_METRICS, EXPECTED)

    # Assert
    assert reason == "array 'conv.weight' has dtype float64, expected float32"


def test_value_that_is_not_a_numpy_array_is_rejected() -> None:
    # Prepare
    arrays: dict[str, object] = dict(good_reply())
    arrays["conv.bias"] = [0.0, 0.0, 0.0, 0.0]

    # Execute
    reason = validate_reply(arrays, 32, GOOD_METRICS, EXPECTED)  # type: ignore[arg-type]

    # Assert
    assert reason == "array 'conv.bias' is a list, not a numpy array"


def test_missing_array_is_rejected_naming_it() -> None:
    # Prepare
    arrays = good_reply()
    del arrays["conv.bias"]

    # Execute
    reason = validate_reply(arrays, 32, GOOD_METRICS, EXPECTED)

    # Assert
    assert reason == "missing arrays: 'conv.bias'"


def test_extra_array_is_rejected_naming_it() -> None:
    # Prepare
    arrays = good_reply()
    arrays["backdoor"] = np.zeros(1, dtype=np.float32)

    # Execute
    reason = validate_reply(arrays, 32, GOOD_METRICS, EXPECTED)

    # Assert
    assert reason == "unexpected arrays: 'backdoor'"


def test_misnamed_array_is_rejected_naming_both_names() -> None:
    # Prepare
    arrays = good_reply()
    arrays["conv.bais"] = arrays.pop("conv.bias")

    # Execute
    reason = validate_reply(arrays, 32, GOOD_METRICS, EXPECTED)

    # Assert
    assert reason == "missing arrays: 'conv.bias'; unexpected arrays: 'conv.bais'"


def test_many_misnamed_arrays_give_a_short_reason() -> None:
    # Prepare
    expected = {f"layer{i:02d}": ArraySpec((1,), np.dtype(np.float32)) for i in range(40)}
    arrays = {f"other{i:02d}": np.zeros(1, dtype=np.float32) for i in range(40)}

    # Execute
    reason = validate_reply(arrays, 32, None, expected)

    # Assert
    assert reason is not None
    assert "'layer00'" in reason
    assert "and 35 more" in reason
    assert len(reason) < 250


def test_reply_without_arrays_is_rejected() -> None:
    # Execute
    reason = validate_reply(None, 32, GOOD_METRICS, EXPECTED)

    # Assert
    assert reason == "reply carries no arrays"


@pytest.mark.parametrize(
    ("num_examples", "expected"),
    [
        (0, "num-examples must be >= 1, got 0"),
        (-1, "num-examples must be >= 1, got -1"),
        (-3.0, "num-examples must be >= 1, got -3.0"),
        (2.5, "num-examples must be an integer, got 2.5"),
        (float("nan"), "num-examples must be an integer, got nan"),
        (float("inf"), "num-examples must be an integer, got inf"),
        ("3", "num-examples must be an integer, got str"),
        (True, "num-examples must be an integer, got a bool (True)"),
        (False, "num-examples must be an integer, got a bool (False)"),
        (np.bool_(True), "num-examples must be an integer, got a bool"),
        (None, "num-examples must be an integer, got NoneType"),
        ([3], "num-examples must be an integer, got list"),
        (1e19, "num-examples 1e+19 exceeds 9007199254740992"),
        (2**63 + 1, "num-examples 9223372036854775809 exceeds 9007199254740992"),
        (np.uint64(2**64 - 1), "num-examples 18446744073709551615 exceeds"),
    ],
)
def test_bad_num_examples_is_rejected_with_a_precise_reason(
    num_examples: object, expected: str
) -> None:
    # Execute
    reason = validate_reply(good_reply(), num_examples, GOOD_METRICS, EXPECTED)

    # Assert
    assert reason is not None
    assert reason.startswith(expected)


@pytest.mark.parametrize(
    "bad_value", [float("nan"), float("inf"), -float("inf"), np.float32("nan")]
)
def test_non_finite_metric_is_rejected_naming_the_key(bad_value: float) -> None:
    # Prepare
    metrics = {"train_loss": bad_value, "num-examples": 32}

    # Execute
    reason = validate_reply(good_reply(), 32, metrics, EXPECTED)

    # Assert
    assert reason is not None
    assert reason.startswith("metric 'train_loss' is not a finite number")


@pytest.mark.parametrize("bad_value", ["0.3", None, True, [0.1, 0.2], {"a": 1}, b"1"])
def test_non_number_metric_is_rejected_naming_the_key(bad_value: object) -> None:
    # Prepare
    metrics = {"num-examples": 32, "accuracy": bad_value}

    # Execute
    reason = validate_reply(good_reply(), 32, metrics, EXPECTED)

    # Assert
    assert reason is not None
    assert reason.startswith("metric 'accuracy' is not a finite number")


def test_arrays_are_checked_before_num_examples_and_metrics() -> None:
    # Prepare
    arrays = good_reply()
    arrays["conv.bias"][0] = np.nan

    # Execute
    reason = validate_reply(arrays, -1, {"loss": float("nan")}, EXPECTED)

    # Assert
    assert reason == "array 'conv.bias' holds NaN or infinite values"


def test_ordered_arrays_follow_the_expected_order_not_the_reply_order() -> None:
    # Prepare
    arrays = dict(reversed(list(good_reply().items())))

    # Execute
    ordered = ordered_arrays(arrays, EXPECTED)

    # Assert
    assert [a.shape for a in ordered] == [(4, 1, 3, 3), (4,), ()]


def test_second_reply_of_a_node_in_a_round_is_a_duplicate() -> None:
    # Prepare
    tracker = RoundReplyTracker(server_round=3)

    # Execute
    first = tracker.check_duplicate(17)
    other_node = tracker.check_duplicate(18)
    second = tracker.check_duplicate(17)
    next_round = RoundReplyTracker(server_round=4).check_duplicate(17)

    # Assert
    assert first is None
    assert other_node is None
    assert second == "duplicate reply from node 17 in round 3"
    assert next_round is None
    assert tracker.replied_nodes == frozenset({17, 18})


def test_rejection_log_counts_per_node_and_keeps_reasons_in_order() -> None:
    # Prepare
    log = RejectionLog()

    # Execute
    log.record(5, "array 'w' holds NaN or infinite values")
    log.record(9, "missing arrays: 'b'")
    log.record(5, "duplicate reply from node 5 in round 2")

    # Assert
    assert log.counts == {5: 2, 9: 1}
    assert log.total == 3
    assert log.reasons[0] == (5, "array 'w' holds NaN or infinite values")
    assert log.reasons[-1] == (5, "duplicate reply from node 5 in round 2")


def test_validating_an_11m_parameter_reply_is_fast() -> None:
    # Prepare: ResNet-18-sized reply, 11.2M float32 values in 3 arrays
    rng = np.random.default_rng(0)
    arrays = {
        "big": rng.standard_normal(9_000_000, dtype=np.float32),
        "mid": rng.standard_normal((1000, 2000), dtype=np.float32),
        "small": rng.standard_normal(200_000, dtype=np.float32),
    }
    expected = specs_from_arrays(arrays)
    validate_reply(arrays, 32, GOOD_METRICS, expected)  # warm-up

    # Execute
    start = time.perf_counter()
    reason = validate_reply(arrays, 32, GOOD_METRICS, expected)
    elapsed = time.perf_counter() - start
    arrays["big"][-1] = np.inf
    bad_reason = validate_reply(arrays, 32, GOOD_METRICS, expected)

    # Assert: about 1-3 ms here; a generous bound keeps slow CI machines green
    assert reason is None
    assert bad_reason == "array 'big' holds NaN or infinite values"
    assert elapsed < 0.5


@pytest.mark.parametrize(
    ("partition_id", "expected"),
    [
        (-2, "partition-id must be >= -1, got -2"),
        (2**31, "partition-id 2147483648 exceeds 2147483647"),
        (1e300, "partition-id 1e+300 exceeds 2147483647"),
        (0.5, "partition-id must be an integer, got 0.5"),
        (float("nan"), "metric 'partition-id' is not a finite number: nan"),
        ([1], "metric 'partition-id' is not a finite number: [1]"),
        (True, "metric 'partition-id' is not a finite number: True"),
    ],
)
def test_bad_partition_id_is_rejected_with_a_precise_reason(
    partition_id: object, expected: str
) -> None:
    # Prepare
    metrics = {"num-examples": 32, "partition-id": partition_id}

    # Execute
    reason = validate_reply(good_reply(), 32, metrics, EXPECTED)

    # Assert
    assert reason == expected


@pytest.mark.parametrize("partition_id", [-1, 0, 2**31 - 1, 3.0, np.int64(7)])
def test_partition_ids_in_range_are_accepted(partition_id: object) -> None:
    # Execute
    reason = validate_reply(good_reply(), 32, {"partition-id": partition_id}, EXPECTED)

    # Assert
    assert reason is None


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"train-loss": -0.5}, "metric 'train-loss' -0.5 is outside [0, inf]"),
        ({"train-accuracy": 1.5}, "metric 'train-accuracy' 1.5 is outside [0, 1]"),
        ({"train-accuracy": -0.1}, "metric 'train-accuracy' -0.1 is outside [0, 1]"),
        ({"train-seconds": -3}, "metric 'train-seconds' -3 is outside [0, inf]"),
        ({f"m{i}": 0.0 for i in range(65)}, "reply carries 65 metrics, more than 64"),
        ({"x" * 101: 0.0}, "is not a short string"),
    ],
)
def test_metrics_out_of_their_range_are_rejected(metrics: dict, expected: str) -> None:
    # Execute
    reason = validate_reply(good_reply(), 32, metrics, EXPECTED)

    # Assert
    assert reason is not None and expected in reason


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        (None, "evaluate reply carries no metrics"),
        ({"num-examples": 5, "eval-loss": 0.3}, "evaluate reply lacks eval-accuracy"),
        ({"eval-loss": 0.3}, "evaluate reply lacks num-examples, eval-accuracy"),
        (
            {"num-examples": -1, "eval-loss": 0.3, "eval-accuracy": 0.5},
            "num-examples must be >= 0",
        ),
        (
            {"num-examples": 1e19, "eval-loss": 0.3, "eval-accuracy": 0.5},
            "num-examples 1e+19 exceeds",
        ),
        (
            {"num-examples": 5, "eval-loss": float("inf"), "eval-accuracy": 0.5},
            "metric 'eval-loss' is not a finite number: inf",
        ),
        (
            {"num-examples": 5, "eval-loss": -1e-9, "eval-accuracy": 0.5},
            "metric 'eval-loss' -1e-09 is outside [0, inf]",
        ),
        (
            {"num-examples": 5, "eval-loss": 0.3, "eval-accuracy": 1.0000001},
            "metric 'eval-accuracy' 1.0000001 is outside [0, 1]",
        ),
        (
            {"num-examples": 5, "eval-loss": 0.3, "eval-accuracy": 0.5, "partition-id": -9},
            "partition-id must be >= -1, got -9",
        ),
    ],
)
def test_bad_evaluate_metrics_are_rejected_with_a_precise_reason(
    metrics: dict | None, expected: str
) -> None:
    # Execute
    reason = find_evaluate_problem(metrics)

    # Assert
    assert reason is not None and expected in reason


def test_good_evaluate_metrics_are_accepted_with_zero_examples_too() -> None:
    # Execute
    reasons = [
        find_evaluate_problem({"num-examples": n, "eval-loss": 0.0, "eval-accuracy": 1.0})
        for n in (0, 7, 2**53)
    ]

    # Assert
    assert reasons == [None, None, None]


@pytest.mark.parametrize("name", ["train-a!b<script>", "loss\n", "acc\u202e", "ü"])
def test_metric_names_outside_the_safe_characters_are_refused(name):
    reason = validate_reply(good_reply(), 32, {name: 1.0}, EXPECTED)
    assert reason is not None and "uses characters other than" in reason
