"""Tests of strategies.aggregation.streaming against numpy / scipy oracles and properties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from strategies.aggregation import (
    AGGREGATOR_NAMES,
    NonFiniteUpdateError,
    make_aggregator,
)
from strategies.aggregation.server_step import compute_new_global

PROPERTY_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
STREAMING_NAMES = ("mean", "weighted", "fedavg", "clipped")
ROBUST_OPTIONS: dict[str, dict[str, object]] = {
    "mean": {},
    "weighted": {},
    "fedavg": {},
    "clipped": {"clip_norm": 2.0},
    "median": {},
    "trimmed-mean": {"beta": 0.2},
    "krum": {"num_malicious": 1, "num_selected": 2},
}
SHAPES = [(3, 4), (5,), ()]

# -- helpers ----------------------------------------------------------------


def random_updates(
    num_updates: int, seed: int = 0, shapes: list[tuple[int, ...]] | None = None
) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        [rng.standard_normal(shape).astype(np.float32) for shape in shapes or SHAPES]
        for _ in range(num_updates)
    ]


def aggregate(
    name: str,
    updates: list[list[np.ndarray]],
    weights: list[float] | None = None,
    **options: object,
) -> list[np.ndarray]:
    aggregator = make_aggregator(name, **options)
    for update, weight in zip(updates, weights or [1.0] * len(updates), strict=True):
        aggregator.add(update, weight)
    return aggregator.result()


def stacked(updates: list[list[np.ndarray]], index: int) -> np.ndarray:
    return np.stack([update[index] for update in updates]).astype(np.float64)


def float32_tolerance(updates: list[list[np.ndarray]]) -> float:
    """Absolute tolerance of a float32 accumulation over these updates."""
    largest = max(float(np.max(np.abs(a), initial=0.0)) for u in updates for a in u)
    return 4 * len(updates) * np.finfo(np.float32).eps * max(largest, 1.0)


def flat_norm(update: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in update)))


def brute_force_krum(
    updates: list[list[np.ndarray]], num_malicious: int, num_selected: int
) -> tuple[list[int], list[np.ndarray]]:
    """Krum straight from Blanchard et al. 2017, with explicit pairwise distances."""
    vectors = [np.concatenate([a.astype(np.float64).ravel() for a in u]) for u in updates]
    n = len(vectors)
    scores = []
    for i in range(n):
        distances = sorted(
            float(np.sum((vectors[i] - vectors[j]) ** 2)) for j in range(n) if j != i
        )
        scores.append(sum(distances[: n - num_malicious - 2]))
    chosen = sorted(range(n), key=lambda i: scores[i])[:num_selected]
    mean = [np.mean([updates[i][k] for i in chosen], axis=0) for k in range(len(updates[0]))]
    return chosen, mean


# -- hypothesis strategies --------------------------------------------------

FLOATS = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
SMALL_SHAPES = st.lists(
    hnp.array_shapes(min_dims=0, max_dims=2, max_side=4), min_size=1, max_size=3
)


@st.composite
def update_lists(draw: st.DrawFn, min_updates: int = 1, max_updates: int = 8) -> list:
    shapes = draw(SMALL_SHAPES)
    num_updates = draw(st.integers(min_updates, max_updates))
    return [
        [draw(hnp.arrays(np.float32, shape, elements=FLOATS)) for shape in shapes]
        for _ in range(num_updates)
    ]


@st.composite
def updates_with_weights(draw: st.DrawFn) -> tuple[list, list[float]]:
    updates = draw(update_lists())
    weights = draw(st.lists(st.floats(0.01, 100.0), min_size=len(updates), max_size=len(updates)))
    return updates, weights


# -- oracles: each aggregator against numpy / scipy ------------------------


def test_mean_matches_unweighted_numpy_average() -> None:
    # Prepare
    updates = random_updates(6)
    weights = [1.0, 5.0, 0.5, 2.0, 3.0, 9.0]  # ignored by "mean"

    # Execute
    result = aggregate("mean", updates, weights)

    # Assert
    assert len(result) == len(updates[0])
    for index, array in enumerate(result):
        np.testing.assert_allclose(array, stacked(updates, index).mean(axis=0), atol=1e-6)


@pytest.mark.parametrize("name", ["weighted", "fedavg"])
def test_weighted_names_match_numpy_weighted_average(name: str) -> None:
    # Prepare
    updates = random_updates(7, seed=1)
    weights = [10.0, 250.0, 3.0, 1.0, 77.0, 500.0, 12.0]

    # Execute
    result = aggregate(name, updates, weights)

    # Assert
    assert len(result) == len(updates[0])
    for index, array in enumerate(result):
        expected = np.average(stacked(updates, index), axis=0, weights=weights)
        np.testing.assert_allclose(array, expected, atol=1e-6)
        assert array.dtype == np.float32
        assert array.shape == updates[0][index].shape


def test_clipped_matches_clip_then_unweighted_mean() -> None:
    # Prepare
    updates = random_updates(5, seed=2)
    norms = [flat_norm(u) for u in updates]
    clip_norm = float(np.median(norms))
    clipped = [
        [a.astype(np.float64) * min(1.0, clip_norm / norm) for a in u]
        for u, norm in zip(updates, norms, strict=True)
    ]
    aggregator = make_aggregator("clipped", clip_norm=clip_norm)

    # Execute
    for update, weight in zip(updates, [1.0, 100.0, 3.0, 4.0, 5.0], strict=True):
        aggregator.add(update, weight)
    result = aggregator.result()

    # Assert
    assert len(result) == len(updates[0])
    for index, array in enumerate(result):
        np.testing.assert_allclose(array, np.mean([c[index] for c in clipped], axis=0), atol=1e-6)
    assert aggregator.num_clipped == sum(norm > clip_norm for norm in norms)
    assert 0 < aggregator.num_clipped < len(updates)
    assert aggregator.count == len(updates)


def test_clipped_noise_has_the_documented_std_and_follows_the_seed() -> None:
    # Prepare
    num_updates, clip_norm, noise_multiplier = 4, 0.5, 2.0
    updates = [[np.zeros(200_000, dtype=np.float32)] for _ in range(num_updates)]
    options = {"clip_norm": clip_norm, "noise_multiplier": noise_multiplier, "seed": 7}

    # Execute
    first = aggregate("clipped", updates, **options)[0]
    again = aggregate("clipped", updates, **options)[0]
    other_seed = aggregate("clipped", updates, **{**options, "seed": 8})[0]

    # Assert
    expected_std = noise_multiplier * clip_norm / num_updates
    assert first.dtype == np.float32
    assert abs(float(first.std()) - expected_std) < 0.01 * expected_std
    assert abs(float(first.mean())) < 0.01 * expected_std
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_seed)


@pytest.mark.parametrize("num_updates", [5, 6])
def test_median_matches_numpy_median(num_updates: int) -> None:
    # Prepare
    updates = random_updates(num_updates, seed=3)

    # Execute
    result = aggregate("median", updates)

    # Assert
    assert len(result) == len(updates[0])
    for index, array in enumerate(result):
        np.testing.assert_allclose(array, np.median(stacked(updates, index), axis=0), atol=1e-6)
        assert array.dtype == np.float32


@pytest.mark.parametrize(
    ("num_updates", "beta"), list(itertools.product([1, 4, 7, 10], [0.0, 0.1, 0.25, 0.49]))
)
def test_trimmed_mean_matches_scipy_trim_mean(num_updates: int, beta: float) -> None:
    # Prepare
    updates = random_updates(num_updates, seed=4)

    # Execute
    result = aggregate("trimmed-mean", updates, beta=beta)

    # Assert
    assert len(result) == len(updates[0])
    for index, array in enumerate(result):
        expected = scipy.stats.trim_mean(stacked(updates, index), beta, axis=0)
        np.testing.assert_allclose(array, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("num_updates", "num_malicious", "num_selected"),
    [(3, 0, 1), (7, 2, 1), (7, 2, 3), (10, 3, 4), (12, 1, 11)],
)
def test_krum_matches_brute_force(num_updates: int, num_malicious: int, num_selected: int) -> None:
    # Prepare
    updates = random_updates(num_updates, seed=5 + num_updates)
    expected_indices, expected_mean = brute_force_krum(updates, num_malicious, num_selected)
    aggregator = make_aggregator("krum", num_malicious=num_malicious, num_selected=num_selected)

    # Execute
    for update in updates:
        aggregator.add(update)
    result = aggregator.result()

    # Assert
    assert list(aggregator.selected_indices) == expected_indices
    for array, expected in zip(result, expected_mean, strict=True):
        np.testing.assert_allclose(array, expected, atol=1e-6)


def test_krum_with_one_selected_returns_that_update_exactly() -> None:
    # Prepare
    updates = random_updates(5, seed=6)

    # Execute
    aggregator = make_aggregator("krum", num_malicious=1)
    for update in updates:
        aggregator.add(update)
    result = aggregator.result()

    # Assert
    (chosen,) = aggregator.selected_indices
    for array, original in zip(result, updates[chosen], strict=True):
        np.testing.assert_array_equal(array, original)


@pytest.mark.parametrize(("num_updates", "num_malicious"), [(4, 1), (6, 2), (2, 0)])
def test_krum_refuses_fewer_than_2f_plus_3_updates(num_updates: int, num_malicious: int) -> None:
    # Prepare
    aggregator = make_aggregator("krum", num_malicious=num_malicious)
    for update in random_updates(num_updates):
        aggregator.add(update)

    # Execute / Assert
    with pytest.raises(ValueError, match="2f \\+ 3"):
        aggregator.result()


def test_krum_refuses_selecting_more_than_n_minus_f() -> None:
    # Prepare
    aggregator = make_aggregator("krum", num_malicious=1, num_selected=5)
    for update in random_updates(5):
        aggregator.add(update)

    # Execute / Assert
    with pytest.raises(ValueError, match="num_selected"):
        aggregator.result()


# -- errors ------------------------------------------------------------------


def test_unknown_name_lists_every_aggregator_name() -> None:
    # Execute
    with pytest.raises(ValueError) as error:
        make_aggregator("fedsgd")

    # Assert
    for name in AGGREGATOR_NAMES:
        assert name in str(error.value)


def test_option_not_taken_by_the_aggregator_is_refused() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="clip_norm"):
        make_aggregator("fedavg", clip_norm=1.0)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("clipped", {"clip_norm": 0.0}),
        ("clipped", {"clip_norm": -1.0}),
        ("clipped", {"clip_norm": float("nan")}),
        ("clipped", {"clip_norm": float("inf")}),
        ("clipped", {"noise_multiplier": -0.1}),
        ("clipped", {"seed": "seven"}),
        ("trimmed-mean", {"beta": 0.5}),
        ("trimmed-mean", {"beta": -0.1}),
        ("krum", {"num_malicious": -1}),
        ("krum", {"num_selected": 0}),
        ("krum", {"num_selected": 1.5}),
    ],
)
def test_out_of_range_options_are_refused(name: str, options: dict[str, object]) -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        make_aggregator(name, **options)


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
def test_no_updates_raises(name: str) -> None:
    # Prepare
    aggregator = make_aggregator(name)

    # Execute / Assert
    with pytest.raises(ValueError, match="no updates"):
        aggregator.result()


@pytest.mark.parametrize("name", ["weighted", "fedavg"])
def test_zero_total_weight_raises(name: str) -> None:
    # Prepare
    aggregator = make_aggregator(name)
    for update in random_updates(3):
        aggregator.add(update, 0.0)

    # Execute / Assert
    with pytest.raises(ValueError, match="total weight is 0"):
        aggregator.result()


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), "heavy"])
def test_negative_or_non_finite_weight_raises_and_is_not_counted(weight: object) -> None:
    # Prepare
    aggregator = make_aggregator("fedavg")
    aggregator.add(random_updates(1)[0], 2.0)

    # Execute
    with pytest.raises(ValueError, match="weight"):
        aggregator.add(random_updates(1, seed=1)[0], weight)  # type: ignore[arg-type]

    # Assert
    assert aggregator.count == 1


def test_zero_weight_update_is_counted_but_not_folded_in() -> None:
    # Prepare
    good = random_updates(2)
    poisoned = [np.full_like(a, np.nan) for a in good[0]]
    aggregator = make_aggregator("fedavg")

    # Execute
    aggregator.add(good[0], 3.0)
    aggregator.add(poisoned, 0.0)
    aggregator.add(good[1], 1.0)
    result = aggregator.result()

    # Assert
    assert aggregator.count == 3
    assert len(result) == len(good[0])
    for index, array in enumerate(result):
        expected = np.average(stacked(good, index), axis=0, weights=[3.0, 1.0])
        np.testing.assert_allclose(array, expected, atol=1e-6)


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
@pytest.mark.parametrize(
    "bad_update",
    [
        [np.zeros((4, 3), np.float32), np.zeros(5, np.float32), np.zeros((), np.float32)],
        [np.zeros((3, 4), np.float32), np.zeros(5, np.float32)],
        [np.zeros((3, 4), np.float32), np.zeros(5, np.float32), np.zeros((), np.float32)] * 2,
        [np.zeros((3, 4), np.float64), np.zeros(5, np.float32), np.zeros((), np.float32)],
        [np.zeros((3, 4), np.str_), np.zeros(5, np.float32), np.zeros((), np.float32)],
    ],
    ids=["shape", "too-few-arrays", "too-many-arrays", "dtype", "non-numeric"],
)
def test_mismatched_update_raises_and_leaves_the_aggregate_unchanged(
    name: str, bad_update: list[np.ndarray]
) -> None:
    # Prepare
    updates = random_updates(5)
    aggregator = make_aggregator(name, **ROBUST_OPTIONS[name])
    for update in updates:
        aggregator.add(update, 1.0)
    before = aggregator.result()

    # Execute
    with pytest.raises(ValueError):
        aggregator.add(bad_update, 1.0)

    # Assert
    assert aggregator.count == len(updates)
    for array, expected in zip(aggregator.result(), before, strict=True):
        np.testing.assert_array_equal(array, expected)


def test_a_single_array_is_not_mistaken_for_an_update() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="list of arrays"):
        make_aggregator("mean").add(np.zeros((3, 4), np.float32), 1.0)  # type: ignore[arg-type]


# -- dtypes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "values", "weights", "expected"),
    [
        ("mean", [3, 4, 8], None, 5),
        ("mean", [1, 2], None, 2),  # 1.5 rounds to even
        ("mean", [2, 3], None, 2),  # 2.5 rounds to even
        ("fedavg", [10, 20, 30], [1.0, 1.0, 2.0], 22),  # 22.5 rounds to even
        ("weighted", [2**30 + 1, 2**30 + 3], [1.0, 1.0], 2**30 + 2),  # beyond float32
        ("clipped", [100, 200, 300], None, 200),  # counters are never clipped
        ("median", [1, 5, 9, 100], None, 7),
        ("trimmed-mean", [0, 10, 11, 1000, 12], None, 11),
        # integer arrays take no part in Krum's distances: the first three are kept
        ("krum", [10, 11, 12, 13, 5000], None, 11),
    ],
)
def test_integer_arrays_stay_integer_and_are_rounded_means(
    name: str, values: list[int], weights: list[float] | None, expected: int
) -> None:
    # Prepare
    options = {"trimmed-mean": {"beta": 0.2}, "krum": {"num_malicious": 1, "num_selected": 3}}
    updates = [
        [np.array(value, dtype=np.int64), np.full(3, value, dtype=np.int32)] for value in values
    ]

    # Execute
    result = aggregate(name, updates, weights, **options.get(name, {}))

    # Assert
    assert result[0].dtype == np.int64
    assert result[1].dtype == np.int32
    assert result[0].shape == ()
    assert int(result[0]) == expected
    np.testing.assert_array_equal(result[1], np.full(3, expected, dtype=np.int32))


def test_integer_arrays_do_not_count_towards_the_clipping_norm() -> None:
    # Prepare
    steps = np.array(500, dtype=np.int64)  # e.g. num_batches_tracked
    update = [np.full(4, 0.1, dtype=np.float32), steps]
    aggregator = make_aggregator("clipped", clip_norm=1.0)

    # Execute
    aggregator.add(update, 1.0)
    result = aggregator.result()

    # Assert
    assert aggregator.num_clipped == 0
    np.testing.assert_allclose(result[0], update[0])
    assert int(result[1]) == 500


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_dtypes_and_shapes_are_kept(name: str, dtype: type) -> None:
    # Prepare
    updates = [[a.astype(dtype) for a in update] for update in random_updates(5)]

    # Execute
    result = aggregate(name, updates, [1.0, 2.0, 3.0, 4.0, 5.0], **ROBUST_OPTIONS[name])

    # Assert
    for array, original in zip(result, updates[0], strict=True):
        assert array.dtype == dtype
        assert array.shape == original.shape


def test_extreme_weights_neither_overflow_nor_underflow_in_float32() -> None:
    # Prepare
    updates = random_updates(3)

    # Execute
    huge = aggregate("weighted", updates, [1e300, 2e300, 3e300])
    tiny = aggregate("weighted", updates, [1e-300, 2e-300, 3e-300])

    # Assert
    for index in range(len(SHAPES)):
        expected = np.average(stacked(updates, index), axis=0, weights=[1.0, 2.0, 3.0])
        np.testing.assert_allclose(huge[index], expected, atol=1e-6)
        np.testing.assert_allclose(tiny[index], expected, atol=1e-6)


# -- state --------------------------------------------------------------------


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
def test_inputs_are_never_mutated(name: str) -> None:
    # Prepare
    updates = random_updates(6)
    originals = [[a.copy() for a in u] for u in updates]
    for update in updates:
        for array in update:
            array.setflags(write=False)

    # Execute
    result = aggregate(name, updates, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], **ROBUST_OPTIONS[name])
    for array in result:
        array += 1.0  # results are fresh arrays, not views of the inputs

    # Assert
    for update, original in zip(updates, originals, strict=True):
        for array, copy in zip(update, original, strict=True):
            np.testing.assert_array_equal(array, copy)


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
def test_result_does_not_consume_the_aggregator(name: str) -> None:
    # Prepare
    updates = random_updates(7)
    aggregator = make_aggregator(name, **ROBUST_OPTIONS[name])
    for update in updates[:6]:
        aggregator.add(update, 1.0)

    # Execute
    first = aggregator.result()
    second = aggregator.result()
    aggregator.add(updates[6], 1.0)
    after_more = aggregator.result()

    # Assert
    assert aggregator.count == 7
    assert len(first) == len(updates[0])
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    expected = aggregate(name, updates, **ROBUST_OPTIONS[name])
    for a, b in zip(after_more, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


# -- properties ---------------------------------------------------------------


@PROPERTY_SETTINGS
@given(
    data=updates_with_weights(),
    name=st.sampled_from([name for name in AGGREGATOR_NAMES if name != "krum"]),
    seed=st.integers(),
)
def test_order_of_updates_does_not_matter(
    data: tuple[list, list[float]], name: str, seed: int
) -> None:
    # Prepare
    updates, weights = data
    order = np.random.default_rng(abs(seed)).permutation(len(updates))

    # Execute
    forward = aggregate(name, updates, weights, **ROBUST_OPTIONS[name])
    shuffled = aggregate(
        name, [updates[i] for i in order], [weights[i] for i in order], **ROBUST_OPTIONS[name]
    )

    # Assert
    assert len(forward) == len(updates[0])
    for a, b in zip(forward, shuffled, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=float32_tolerance(updates))


def test_krum_order_of_updates_does_not_matter() -> None:
    # Prepare
    updates = random_updates(9, seed=11)
    order = np.random.default_rng(0).permutation(9)

    # Execute
    forward = aggregate("krum", updates, num_malicious=2, num_selected=3)
    shuffled = aggregate("krum", [updates[i] for i in order], num_malicious=2, num_selected=3)

    # Assert
    assert len(forward) == len(updates[0])
    for a, b in zip(forward, shuffled, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@PROPERTY_SETTINGS
@given(
    data=updates_with_weights(),
    name=st.sampled_from(["weighted", "fedavg"]),
    factor=st.floats(1e-3, 1e3),
)
def test_scaling_all_weights_changes_nothing(
    data: tuple[list, list[float]], name: str, factor: float
) -> None:
    # Prepare
    updates, weights = data

    # Execute
    plain = aggregate(name, updates, weights)
    scaled = aggregate(name, updates, [w * factor for w in weights])

    # Assert
    assert len(plain) == len(updates[0])
    for a, b in zip(plain, scaled, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=float32_tolerance(updates))


@PROPERTY_SETTINGS
@given(data=updates_with_weights())
def test_streaming_result_equals_the_batch_formula(data: tuple[list, list[float]]) -> None:
    # Prepare
    updates, weights = data

    # Execute
    result = aggregate("fedavg", updates, weights)

    # Assert
    assert len(result) == len(updates[0])
    for index, array in enumerate(result):
        expected = np.average(stacked(updates, index), axis=0, weights=weights)
        np.testing.assert_allclose(array, expected, rtol=1e-5, atol=float32_tolerance(updates))


@PROPERTY_SETTINGS
@given(updates=update_lists(), clip_norm=st.floats(1e-3, 1e3))
def test_clipped_aggregate_norm_is_at_most_clip_norm(
    updates: list[list[np.ndarray]], clip_norm: float
) -> None:
    # Execute
    aggregator = make_aggregator("clipped", clip_norm=clip_norm)
    for update in updates:
        aggregator.add(update, 1.0)
    result = aggregator.result()

    # Assert: norms are computed in float32, so a norm within rounding of
    # clip_norm may go either way
    norms = [flat_norm(u) for u in updates]
    assert flat_norm(result) <= clip_norm * (1 + 1e-5)
    assert aggregator.num_clipped >= sum(norm > clip_norm * (1 + 1e-5) for norm in norms)
    assert aggregator.num_clipped <= sum(norm > clip_norm * (1 - 1e-5) for norm in norms)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_median_stays_within_honest_range_despite_fewer_than_half_outliers(
    data: st.DataObject,
) -> None:
    # Prepare
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=4))
    num_honest = data.draw(st.integers(1, 6))
    num_outliers = data.draw(st.integers(0, num_honest - 1))
    honest = [data.draw(hnp.arrays(np.float32, shape, elements=FLOATS)) for _ in range(num_honest)]
    any_float = st.floats(width=32, allow_nan=False, allow_infinity=False)
    outliers = [
        data.draw(hnp.arrays(np.float32, shape, elements=any_float)) for _ in range(num_outliers)
    ]

    # Execute
    (median,) = aggregate("median", [[a] for a in honest + outliers])

    # Assert
    assert np.all(median >= np.min(honest, axis=0))
    assert np.all(median <= np.max(honest, axis=0))


@PROPERTY_SETTINGS
@given(data=st.data())
def test_krum_selects_an_honest_update_when_n_exceeds_2f_plus_2(data: st.DataObject) -> None:
    # Prepare
    num_malicious = data.draw(st.integers(0, 3))
    num_updates = data.draw(st.integers(2 * num_malicious + 3, 2 * num_malicious + 6))
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=4))
    unit = st.floats(-1.0, 1.0, width=32)
    far = st.floats(100.0, 1e6, width=32).flatmap(lambda x: st.sampled_from([x, -x]))
    honest = [
        [data.draw(hnp.arrays(np.float32, shape, elements=unit))]
        for _ in range(num_updates - num_malicious)
    ]
    outliers = [
        [data.draw(hnp.arrays(np.float32, shape, elements=far))] for _ in range(num_malicious)
    ]
    positions = data.draw(st.permutations(range(num_updates)))
    updates = [(honest + outliers)[p] for p in positions]
    honest_positions = {i for i, p in enumerate(positions) if p < len(honest)}

    # Execute
    aggregator = make_aggregator("krum", num_malicious=num_malicious)
    for update in updates:
        aggregator.add(update)
    aggregator.result()

    # Assert
    (chosen,) = aggregator.selected_indices
    assert chosen in honest_positions


@PROPERTY_SETTINGS
@given(data=updates_with_weights(), name=st.sampled_from(AGGREGATOR_NAMES))
def test_property_inputs_unmutated(data: tuple[list, list[float]], name: str) -> None:
    # Prepare
    updates, weights = data
    if name == "krum":
        updates, weights = (updates * 5)[:5], (weights * 5)[:5]
    originals = [[a.copy() for a in u] for u in updates]

    # Execute
    aggregate(name, updates, weights, **ROBUST_OPTIONS[name])

    # Assert
    for update, original in zip(updates, originals, strict=True):
        for array, copy in zip(update, original, strict=True):
            np.testing.assert_array_equal(array, copy)


@PROPERTY_SETTINGS
@given(
    values=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=8),
    name=st.sampled_from(["mean", "median", "trimmed-mean"]),
)
def test_int64_results_stay_int64_and_match_the_rounded_oracle(
    values: list[int], name: str
) -> None:
    # Prepare
    updates = [[np.array([value, -value], dtype=np.int64)] for value in values]
    oracle = {
        "mean": lambda x: np.mean(x, axis=0),
        "median": lambda x: np.median(x, axis=0),
        "trimmed-mean": lambda x: scipy.stats.trim_mean(x, 0.2, axis=0),
    }[name]

    # Execute
    (result,) = aggregate(name, updates, **ROBUST_OPTIONS[name])

    # Assert
    expected = np.rint(oracle(np.array(values)[:, None] * [1, -1]))
    assert result.dtype == np.int64
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize(
    "weights",
    [
        [1e-300, 1e300, 1.0],
        [1e300, 1e-300, 1.0],
        [5e-324, 1e-320, 1e308],
        [1.0, 1e308, 1e308],
        [1e-300, 2e-300, 1e300],
        [1.0, 2.0, 3.0],
    ],
)
def test_weights_of_any_scale_are_normalised_in_float64_before_float32_folds(
    weights: list[float],
) -> None:
    # Prepare: the oracle normalises the weights in float64
    updates = random_updates(3)
    normalised = np.array(weights, dtype=np.float64) / max(weights)

    # Execute
    for name in ("weighted", "fedavg"):
        result = aggregate(name, updates, weights)

        # Assert: the right mean, never NaN or infinite
        for index in range(len(SHAPES)):
            expected = np.average(stacked(updates, index), axis=0, weights=normalised)
            assert np.isfinite(result[index]).all()
            np.testing.assert_allclose(result[index], expected, rtol=1e-5, atol=1e-6)


# -- the fused pass: add_difference ------------------------------------------

FUSED_SHAPES = [(300_000,), (7, 11), (), (3,)]  # one array spans several cache blocks


def client_and_global(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    global_arrays = [rng.standard_normal(s).astype(np.float32) for s in FUSED_SHAPES]
    client = [g + 0.1 * rng.standard_normal(g.shape).astype(np.float32) for g in global_arrays]
    return client, global_arrays


@pytest.mark.parametrize("name", STREAMING_NAMES)
def test_add_difference_equals_add_of_the_difference(name: str) -> None:
    """Folding client - global in blocks gives what add() of the difference gives."""
    options = {"clip_norm": 50.0} if name == "clipped" else {}
    fused, plain = make_aggregator(name, **options), make_aggregator(name, **options)
    _, global_arrays = client_and_global(0)
    # Weights that rise, so the running sum is rescaled to a new largest weight
    for seed, weight in zip(range(1, 6), [3.0, 10.0, 1.0, 400.0, 7.0], strict=True):
        client, _ = client_and_global(seed)  # near its own global, far from this one
        fused.add_difference(client, global_arrays, weight)
        plain.add([c - g for c, g in zip(client, global_arrays, strict=True)], weight)
    assert fused.count == plain.count == 5
    fused_result, plain_result = fused.result(), plain.result()
    assert len(fused_result) == len(global_arrays)
    for ours, theirs in zip(fused_result, plain_result, strict=True):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    if name == "clipped":
        assert fused.num_clipped == plain.num_clipped > 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", STREAMING_NAMES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_add_difference_rejects_a_non_finite_update_leaving_the_sum_exactly(
    name: str, bad: float
) -> None:
    """A NaN or infinity deep in the last block is found; nothing of the update is folded."""
    options = {"clip_norm": 1.0} if name == "clipped" else {}
    aggregator = make_aggregator(name, **options)
    client, global_arrays = client_and_global(0)
    aggregator.add_difference(client, global_arrays, 5.0)
    before = [array.copy() for array in aggregator.result()]
    hostile, _ = client_and_global(1)
    hostile[0][-1] = bad  # the blocks before it are finite and would fold first
    with pytest.raises(NonFiniteUpdateError) as caught:
        aggregator.add_difference(hostile, global_arrays, 1000.0)  # a new largest weight too
    assert caught.value.index == 0
    assert aggregator.count == 1
    assert len(before) == len(global_arrays)
    for after, expected in zip(aggregator.result(), before, strict=True):
        np.testing.assert_array_equal(after, expected)


def test_add_difference_keeps_huge_finite_values() -> None:
    """Finite values whose squares overflow float32 are values, not a fault."""
    aggregator = make_aggregator("fedavg")
    client, global_arrays = client_and_global(0)
    client[1][0, 0] = 1e30
    aggregator.add_difference(client, global_arrays, 1.0)
    assert aggregator.result()[1][0, 0] == pytest.approx(1e30, rel=1e-6)


def test_add_difference_refuses_a_layout_that_differs() -> None:
    aggregator = make_aggregator("mean")
    client, global_arrays = client_and_global(0)
    aggregator.add_difference(client, global_arrays)
    with pytest.raises(ValueError, match="shape"):
        aggregator.add_difference([client[0][:10], *client[1:]], global_arrays)
    assert aggregator.count == 1


def test_add_difference_refuses_a_non_finite_update_of_weight_zero() -> None:
    """An operator weight of 0 folds nothing in, yet a NaN update is still refused."""
    aggregator = make_aggregator("weighted")
    client, global_arrays = client_and_global(0)
    aggregator.add_difference(client, global_arrays, 1.0)
    client[1][3, 4] = np.nan
    with pytest.raises(NonFiniteUpdateError) as caught:
        aggregator.add_difference(client, global_arrays, 0.0)
    assert caught.value.index == 1 and aggregator.count == 1


def test_the_server_step_scales_the_update_and_refuses_a_model_that_is_not_finite():
    # Prepare
    base = {"w": np.ones(3, dtype=np.float32), "n": np.array(10, dtype=np.int64)}
    step = [np.full(3, 2.0, dtype=np.float32), np.array(4.0)]
    overflow = [np.full(3, 3e38, dtype=np.float32), np.array(0.0)]

    # Execute
    new, problem = compute_new_global(base, step, 0.5)
    kept, reason = compute_new_global(base, overflow, 10.0)

    # Assert: each dtype kept, the counter rounded; an overflow keeps the model
    assert problem == ""
    np.testing.assert_array_equal(new["w"], np.full(3, 2.0, dtype=np.float32))
    assert new["w"].dtype == np.float32 and int(new["n"]) == 12
    assert kept is None and reason.startswith("new global model is not finite ('w'")
    np.testing.assert_array_equal(base["w"], np.ones(3, dtype=np.float32))
