"""Models by name, with initial weights reproducible from a seed."""

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models as tv_models

from task.names import MODEL_NAMES

InputShape = tuple[int, int, int]


class SimpleCNN(nn.Module):
    """The CNN of the FedAvg paper's MNIST experiments.

    Two 5x5 convolutions (32 and 64 channels, each followed by ReLU and 2x2 max
    pooling), a 512-unit fully connected layer with ReLU and a linear classifier:
    1,663,370 parameters on 1x28x28 inputs with 10 classes.
    Paper: https://arxiv.org/abs/1602.05629

    Parameters
    ----------
    input_shape : tuple[int, int, int]
        ``(channels, height, width)`` of one example.
    num_classes : int
        Number of output logits.
    """

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        flat_size = 64 * (height // 4) * (width // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat_size, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits, shape ``(N, num_classes)``."""
        return self.classifier(self.features(x))


def build_model(name: str, input_shape: InputShape, num_classes: int, seed: int) -> nn.Module:
    """Build a model whose initial weights depend only on ``seed``.

    The global RNG state is left as it was.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`.
    input_shape : tuple[int, int, int]
        ``(channels, height, width)`` of one example; at least 4x4 for simple-cnn.
    num_classes : int
        Number of output logits.
    seed : int
        Seed of the initial weights.

    Returns
    -------
    torch.nn.Module
        The model on the CPU, in training mode.

    Raises
    ------
    ValueError
        If ``name`` is unknown or the shape cannot be used.
    """
    if name not in _BUILDERS:
        raise ValueError(f"Unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
    channels, height, width = input_shape
    if min(channels, height, width) < 1 or num_classes < 1:
        raise ValueError(f"Bad input_shape {input_shape} or num_classes {num_classes}")
    if name == "simple-cnn" and min(height, width) < 4:
        raise ValueError(f"simple-cnn needs inputs of at least 4x4, got {input_shape}")
    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator: torch.manual_seed would also reseed CUDA/MPS.
        torch.random.default_generator.manual_seed(seed)
        return _BUILDERS[name](input_shape, num_classes)


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameters (trainable or not, buffers excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())


def _build_simple_cnn(input_shape: InputShape, num_classes: int) -> nn.Module:
    return SimpleCNN(input_shape, num_classes)


def _build_resnet18(input_shape: InputShape, num_classes: int) -> nn.Module:
    """ResNet-18 with the CIFAR stem: 3x3 stride-1 first conv, no max pooling."""
    model = tv_models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = _small_input_conv(input_shape[0], 64)
    model.maxpool = nn.Identity()
    return model


def _build_mobilenet_v2(input_shape: InputShape, num_classes: int) -> nn.Module:
    """MobileNetV2 whose first conv has stride 1 and takes the input's channels."""
    model = tv_models.mobilenet_v2(weights=None, num_classes=num_classes)
    first_block = model.features[0]
    first_block[0] = _small_input_conv(input_shape[0], first_block[0].out_channels)
    return model


def _small_input_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """Return a 3x3 stride-1 conv initialised like torchvision's own convs."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


_BUILDERS: dict[str, Callable[[InputShape, int], nn.Module]] = {
    "simple-cnn": _build_simple_cnn,
    "resnet18": _build_resnet18,
    "mobilenet-v2": _build_mobilenet_v2,
}
