"""Tests of task.models: shapes, parameter counts and seeded initialisation."""

import pytest
import torch

from task.models import MODEL_NAMES, build_model, count_parameters

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("input_shape", SHAPES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape(name: str, input_shape: tuple[int, int, int]) -> None:
    # Prepare
    model = build_model(name, input_shape, num_classes=10, seed=0).eval()
    batch = torch.randn(2, *input_shape)

    # Execute
    with torch.no_grad():
        logits = model(batch)

    # Assert
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_simple_cnn_has_fedavg_paper_parameter_count() -> None:
    # Execute
    model = build_model("simple-cnn", (1, 28, 28), num_classes=10, seed=0)

    # Assert
    assert count_parameters(model) == 1_663_370


def test_simple_cnn_adapts_to_channels_and_classes() -> None:
    # Execute
    model = build_model("simple-cnn", (3, 8, 8), num_classes=4, seed=0)

    # Assert: conv1 3*32*25+32, conv2 51,264, fc1 (64*2*2)*512+512, fc2 512*4+4
    assert count_parameters(model) == 2_432 + 51_264 + 131_584 + 2_052


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_weights_other_seed_other_weights(name: str) -> None:
    # Prepare
    global_state = torch.get_rng_state()

    # Execute
    first = build_model(name, (1, 8, 8), 10, seed=7).state_dict()
    again = build_model(name, (1, 8, 8), 10, seed=7).state_dict()
    other = build_model(name, (1, 8, 8), 10, seed=8).state_dict()

    # Assert
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_unknown_model_lists_valid_names() -> None:
    # Execute / Assert
    with pytest.raises(ValueError) as error:
        build_model("vgg16", (1, 28, 28), 10, seed=0)
    assert all(name in str(error.value) for name in MODEL_NAMES)
