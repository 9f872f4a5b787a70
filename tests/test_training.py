"""Tests of task.training on scikit-learn's digits, on the CPU."""

import warnings

import numpy as np
import pytest
import torch

from task import training
from task.datasets import DatasetSplits, TensorSplit, load_dataset
from task.models import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return load_dataset("digits", "/unused", seed=0)


def subset(split: TensorSplit, count: int) -> TensorSplit:
    return TensorSplit(split.x[:count], split.y[:count])


def distance(model: torch.nn.Module, start: dict[str, np.ndarray]) -> float:
    now = training.model_to_numpy(model)
    return float(np.sqrt(sum(np.sum((now[key] - start[key]) ** 2) for key in start)))


def test_training_lowers_loss_and_beats_chance(digits: DatasetSplits) -> None:
    # Prepare
    model = build_model("simple-cnn", digits.input_shape, digits.num_classes, seed=0)
    before = training.test(model, digits.test, batch_size=256, device=CPU)

    # Execute
    result = training.train(
        model, digits.train, epochs=2, batch_size=32, lr=0.05, momentum=0.9, device=CPU, seed=0
    )
    after = training.test(model, digits.test, batch_size=256, device=CPU)

    # Assert
    assert result.num_examples == 1437 and result.seconds > 0
    assert np.isfinite(result.loss) and 0.0 <= result.accuracy <= 1.0
    assert before.num_examples == after.num_examples == 360
    assert after.loss < 0.5 * before.loss
    assert after.accuracy > 0.8  # chance is 0.1


def test_training_is_reproducible_from_seed(digits: DatasetSplits) -> None:
    # Prepare
    data = subset(digits.train, 200)
    models = [build_model("simple-cnn", (1, 8, 8), 10, seed=1) for _ in range(3)]

    # Execute
    for model, seed in zip(models, [5, 5, 6], strict=True):
        training.train(
            model, data, epochs=1, batch_size=16, lr=0.05, momentum=0.9, device=CPU, seed=seed
        )
    states = [training.model_to_numpy(model) for model in models]

    # Assert
    assert all(np.array_equal(states[0][key], states[1][key]) for key in states[0])
    assert not all(np.array_equal(states[0][key], states[2][key]) for key in states[0])


def test_proximal_term_keeps_weights_closer_to_start(digits: DatasetSplits) -> None:
    # Prepare
    data = subset(digits.train, 400)
    plain = build_model("simple-cnn", (1, 8, 8), 10, seed=2)
    proximal = build_model("simple-cnn", (1, 8, 8), 10, seed=2)
    start = training.model_to_numpy(plain)
    settings = {"epochs": 2, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "device": CPU}

    # Execute
    plain_result = training.train(plain, data, seed=0, **settings)
    proximal_result = training.train(proximal, data, seed=0, proximal_mu=1.0, **settings)

    # Assert
    assert np.isfinite(proximal_result.loss) and np.isfinite(plain_result.loss)
    assert distance(proximal, start) < 0.9 * distance(plain, start)


def test_iterate_batches_visits_every_example_once_without_a_batch_of_one() -> None:
    # Prepare: 65 examples in batches of 32 would leave a trailing batch of one
    split = TensorSplit(torch.arange(65, dtype=torch.float32).view(65, 1, 1, 1), torch.arange(65))

    # Execute
    batches = list(training.iterate_batches(split, 32, CPU, True, torch.Generator().manual_seed(0)))
    again = list(training.iterate_batches(split, 32, CPU, True, torch.Generator().manual_seed(0)))

    # Assert
    assert [len(y) for _, y in batches] == [32, 33]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(65))
    assert seen.tolist() != list(range(65))
    assert torch.equal(seen, torch.cat([y for _, y in again]))
    assert all(torch.equal(x.view(-1), y.float()) for x, y in batches)


def test_evaluating_an_empty_split_gives_zero_examples() -> None:
    # Prepare
    model = build_model("simple-cnn", (1, 8, 8), 10, seed=0)
    empty = TensorSplit(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64))

    # Execute
    result = training.test(model, empty, batch_size=8, device=CPU)

    # Assert
    assert result == training.EvalResult(loss=0.0, accuracy=0.0, num_examples=0)


def test_resolve_device() -> None:
    # Execute / Assert
    assert training.resolve_device("cpu") == CPU
    assert training.resolve_device("auto").type in {"cuda", "mps", "cpu"}
    with pytest.raises(ValueError, match="cuda:N"):
        training.resolve_device("tpu")
    with pytest.raises(ValueError, match="cuda"):
        training.resolve_device("cuda:99")
    if not torch.cuda.is_available():
        assert training.resolve_device("auto").type in {"mps", "cpu"}
        with pytest.raises(ValueError, match="not available"):
            training.resolve_device("cuda")


def test_model_to_numpy_round_trip() -> None:
    # Prepare
    source = build_model("resnet18", (1, 8, 8), 10, seed=0)
    source.train()
    with torch.no_grad():
        source(torch.randn(4, 1, 8, 8))  # moves BatchNorm running stats
    target = build_model("resnet18", (1, 8, 8), 10, seed=1)

    # Execute
    arrays = training.model_to_numpy(source)
    read_only = {}
    for key, value in arrays.items():
        read_only[key] = value.copy()
        read_only[key].setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        training.load_numpy_into(target, read_only)

    # Assert
    assert list(arrays) == list(source.state_dict())
    assert any("running_mean" in key for key in arrays)
    assert all(isinstance(value, np.ndarray) for value in arrays.values())
    loaded = target.state_dict()
    assert all(np.array_equal(loaded[key].numpy(), arrays[key]) for key in arrays)
    with torch.no_grad():
        next(source.parameters()).add_(1.0)  # the arrays are copies, not views
    assert not np.array_equal(arrays["conv1.weight"], source.state_dict()["conv1.weight"])


def test_load_numpy_into_refuses_mismatches() -> None:
    # Prepare
    model = build_model("simple-cnn", (1, 8, 8), 10, seed=0)
    arrays = training.model_to_numpy(model)
    first_key = next(iter(arrays))

    # Execute / Assert
    missing = {key: value for key, value in arrays.items() if key != first_key}
    with pytest.raises(ValueError, match="missing"):
        training.load_numpy_into(model, missing)
    reshaped = {**arrays, first_key: arrays[first_key].reshape(-1)}
    with pytest.raises(ValueError, match="shape"):
        training.load_numpy_into(model, reshaped)
