"""Byzantine client attacks (client/byzantine.py) and their run-config keys."""

from __future__ import annotations

import math

import numpy as np
import pytest

from client.byzantine import byzantine_arrays
from task.config import ConfigError, parse_run_config


def l2(arrays: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays.values()))


@pytest.fixture()
def received() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((8, 5)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
        "steps": np.array(3, dtype=np.int64),
    }


@pytest.fixture()
def trained(received: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "w": received["w"] + 0.01 * rng.standard_normal((8, 5)).astype(np.float32),
        "b": received["b"] + 0.01 * rng.standard_normal(5).astype(np.float32),
        "steps": np.array(7, dtype=np.int64),
    }


def test_flip_sends_minus_ten_times_the_honest_update(received, trained):
    # Execute
    attacked = byzantine_arrays(received, trained, "flip", np.random.default_rng(0))

    # Assert: float arrays are received - 10 * (trained - received); the counter is honest
    for name in ("w", "b"):
        expected = received[name] - 10.0 * (trained[name] - received[name])
        np.testing.assert_allclose(attacked[name], expected, rtol=1e-5, atol=1e-6)
        assert attacked[name].dtype == np.float32
    assert attacked["steps"] == 7 and attacked["steps"].dtype == np.int64


def test_noise_has_a_norm_100_times_the_honest_update(received, trained):
    # Prepare
    honest = {n: trained[n].astype(np.float64) - received[n] for n in ("w", "b")}

    # Execute
    attacked = byzantine_arrays(received, trained, "noise", np.random.default_rng(0))

    # Assert
    noise = {n: attacked[n].astype(np.float64) - received[n] for n in ("w", "b")}
    assert l2(noise) == pytest.approx(100.0 * l2(honest), rel=1e-4)
    assert attacked["w"].shape == (8, 5) and attacked["w"].dtype == np.float32
    assert attacked["steps"] == 7


def test_noise_is_reproducible_from_the_generator(received, trained):
    # Execute
    first = byzantine_arrays(received, trained, "noise", np.random.default_rng(5))
    again = byzantine_arrays(received, trained, "noise", np.random.default_rng(5))

    # Assert
    np.testing.assert_array_equal(first["w"], again["w"])


def test_inputs_are_not_mutated(received, trained):
    # Prepare
    before = {n: a.copy() for n, a in trained.items()}

    # Execute
    byzantine_arrays(received, trained, "flip", np.random.default_rng(0))

    # Assert
    for name, array in before.items():
        np.testing.assert_array_equal(trained[name], array)


def test_unknown_mode_is_refused(received, trained):
    with pytest.raises(ValueError, match="unknown byzantine-mode 'swap'"):
        byzantine_arrays(received, trained, "swap", np.random.default_rng(0))


def test_byzantine_keys_parse_and_default_to_off():
    # Execute
    default = parse_run_config({})
    chosen = parse_run_config({"byzantine-partitions": "0, 2,5", "byzantine-mode": "noise"})

    # Assert
    assert default.byzantine_partitions == frozenset()
    assert chosen.byzantine_partitions == frozenset({0, 2, 5})
    assert chosen.byzantine_mode == "noise"


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("byzantine-mode", "swap", "unknown byzantine-mode 'swap'; valid: flip, noise"),
        ("byzantine-partitions", "0,x", "byzantine-partitions must list partition ids"),
        ("byzantine-partitions", "-1", "byzantine-partitions must list partition ids"),
    ],
)
def test_bad_byzantine_keys_are_refused(key, value, named):
    with pytest.raises(ConfigError) as error:
        parse_run_config({key: value})
    assert named in str(error.value)
