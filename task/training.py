"""Local training and evaluation loops, device selection and weight conversion.

The loops have the shape of pytorch/examples' ``mnist/main.py`` but read
batches straight from in-memory tensors (no DataLoader) and keep running
metrics on the device, synchronising once per call, so they cost what a plain
PyTorch loop costs.
"""

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from task.datasets import TensorSplit

DEVICE_CHOICES = "auto (cuda, then mps, then cpu), cpu, mps, cuda, cuda:N"
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda|cuda:(\d+))$")


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train` reports.

    ``loss`` (cross-entropy, without the proximal term) and ``accuracy`` are
    averaged over the examples of the last epoch, measured on the fly while
    the weights were being updated.
    """

    loss: float
    accuracy: float
    num_examples: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy and accuracy of a model on a split."""

    loss: float
    accuracy: float
    num_examples: int


def resolve_device(spec: str) -> torch.device:
    """Turn a device string from the run config into an available device.

    Parameters
    ----------
    spec : str
        ``auto`` (cuda, then mps, then cpu), ``cpu``, ``mps``, ``cuda`` (the
        current CUDA device) or ``cuda:N``.

    Returns
    -------
    torch.device
        The device, with an explicit index for CUDA.

    Raises
    ------
    ValueError
        If the form is unknown or the device is not available on this machine.
    """
    match = _DEVICE_PATTERN.match(spec.strip().lower())
    if match is None:
        raise ValueError(f"Unknown device {spec!r}; valid forms: {DEVICE_CHOICES}")
    name = match.group(1)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"Device 'mps' is not available here; valid forms: {DEVICE_CHOICES}")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ValueError(f"Device {spec!r}: CUDA is not available here; use cpu or auto")
    index = torch.cuda.current_device() if match.group(2) is None else int(match.group(2))
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"Device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here "
            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
        )
    return torch.device("cuda", index)


def move_split(split: TensorSplit, device: torch.device) -> TensorSplit:
    """Return ``split`` on ``device``; unchanged if it is already there.

    For CUDA the host tensors are pinned once and copied with
    ``non_blocking=True``, so the copy overlaps with whatever runs next.
    """
    if _on_device(split.x, device) and _on_device(split.y, device):
        return split
    if device.type == "cuda":
        x = split.x if split.x.is_pinned() else split.x.pin_memory()
        y = split.y if split.y.is_pinned() else split.y.pin_memory()
        return TensorSplit(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    return TensorSplit(split.x.to(device), split.y.to(device))


def iterate_batches(
    split: TensorSplit,
    batch_size: int,
    device: torch.device,
    shuffle: bool,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` mini-batches on ``device`` by slicing in-memory tensors.

    The split is moved to ``device`` once (see :func:`move_split`) and batches
    are cut there. A trailing batch of a single example is merged into the one
    before it, because BatchNorm cannot train on one example.

    Parameters
    ----------
    split : TensorSplit
        The examples; may already live on ``device``.
    batch_size : int
        Examples per batch (the last one may differ).
    device : torch.device
        Where the batches are yielded.
    shuffle : bool
        Whether to visit the examples in a random order.
    generator : torch.Generator | None
        CPU generator of the order when shuffling; the global one if ``None``.

    Yields
    ------
    tuple[torch.Tensor, torch.Tensor]
        Inputs and labels of one batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = move_split(split, device)
    num_examples = len(data)
    order = None
    if shuffle:
        order = torch.randperm(num_examples, generator=generator).to(data.x.device)
    for start, stop in _batch_bounds(num_examples, batch_size):
        if order is None:
            yield data.x[start:stop], data.y[start:stop]
        else:
            rows = order[start:stop]
            yield data.x[rows], data.y[rows]


def train(
    model: nn.Module,
    split: TensorSplit,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place with SGD on ``split``.

    With ``proximal_mu > 0`` the FedProx term ``(mu / 2) * ||w - w_global||^2``
    is added to the objective, ``w_global`` being the weights at entry
    (https://arxiv.org/abs/1812.06127); its gradient ``mu * (w - w_global)`` is
    added to the parameters' gradients directly. On CUDA the forward pass runs
    under bf16 autocast.

    Parameters
    ----------
    model : nn.Module
        The model; moved to ``device`` and left there in training mode.
    split : TensorSplit
        Local training examples.
    epochs : int
        Passes over ``split``.
    batch_size : int
        Examples per SGD step.
    lr : float
        SGD learning rate.
    momentum : float
        SGD momentum.
    device : torch.device
        Device to train on (see :func:`resolve_device`).
    seed : int
        Seed of the batch order.
    proximal_mu : float
        FedProx coefficient; 0 disables the term.

    Returns
    -------
    TrainResult
        Last-epoch mean loss and accuracy, ``len(split)`` and wall-clock seconds.
    """
    if epochs < 1 or len(split) == 0:
        raise ValueError(f"train needs epochs >= 1 and examples, got {epochs} / {len(split)}")
    started = time.perf_counter()
    model.to(device)
    model.train()
    data = move_split(split, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        for x, y in iterate_batches(data, batch_size, device, True, generator):
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            loss.backward()
            if anchors:
                _add_proximal_gradient(params, anchors, proximal_mu)
            optimizer.step()
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.argmax(dim=1) == y).sum()
    total_loss, total_correct = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
    return TrainResult(
        loss=total_loss / len(data),
        accuracy=total_correct / len(data),
        num_examples=len(data),
        seconds=time.perf_counter() - started,
    )


def test(
    model: nn.Module, split: TensorSplit, *, batch_size: int, device: torch.device
) -> EvalResult:
    """Evaluate ``model`` on ``split`` without tracking gradients.

    Parameters
    ----------
    model : nn.Module
        The model; moved to ``device`` and left there in eval mode.
    split : TensorSplit
        Examples to evaluate on.
    batch_size : int
        Examples per forward pass.
    device : torch.device
        Device to evaluate on; bf16 autocast on CUDA.

    Returns
    -------
    EvalResult
        Mean cross-entropy and accuracy; zeros with ``num_examples=0`` for an
        empty split.
    """
    if len(split) == 0:
        return EvalResult(loss=0.0, accuracy=0.0, num_examples=0)
    model.to(device)
    model.eval()
    with torch.inference_mode():
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        for x, y in iterate_batches(split, batch_size, device, False):
            with _autocast(device):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
        total_loss, total_correct = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
    return EvalResult(
        loss=total_loss / len(split), accuracy=total_correct / len(split), num_examples=len(split)
    )


def model_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """Return detached CPU copies of the state dict (parameters and buffers), in order."""
    return {
        name: tensor.detach().to("cpu", copy=True).numpy()
        for name, tensor in model.state_dict().items()
    }


def load_numpy_into(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy ``arrays`` into the model's parameters and buffers, in place.

    Parameters
    ----------
    model : nn.Module
        Receives the values; its devices and dtypes are kept.
    arrays : Mapping[str, np.ndarray]
        One array per state-dict entry, same names and shapes.

    Raises
    ------
    ValueError
        If names are missing or extra, or a shape differs.
    """
    state = model.state_dict()
    missing, extra = state.keys() - arrays.keys(), arrays.keys() - state.keys()
    if missing or extra:
        raise ValueError(f"State mismatch: missing {sorted(missing)}, extra {sorted(extra)}")
    with torch.no_grad():
        for name, target in state.items():
            value = np.asarray(arrays[name])
            if value.shape != tuple(target.shape):
                raise ValueError(
                    f"{name}: shape {value.shape} does not match {tuple(target.shape)}"
                )
            # np.require copies read-only buffers (e.g. from np.frombuffer) for torch.
            target.copy_(torch.from_numpy(np.require(value, requirements=["C", "W"])))


def _add_proximal_gradient(
    params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float
) -> None:
    """Add ``mu * (w - w_global)`` to each parameter's gradient."""
    triples = [(p.grad, p, a) for p, a in zip(params, anchors, strict=True) if p.grad is not None]
    if not triples:
        return
    with torch.no_grad():
        grads = [grad for grad, _, _ in triples]
        deltas = torch._foreach_sub([p.detach() for _, p, _ in triples], [a for _, _, a in triples])
        torch._foreach_add_(grads, deltas, alpha=mu)


def _autocast(device: torch.device) -> torch.autocast:
    """Return bf16 autocast on CUDA, a disabled autocast elsewhere."""
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )


def _on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type and (
        device.index is None or tensor.device.index == device.index
    )


def _batch_bounds(num_examples: int, batch_size: int) -> list[tuple[int, int]]:
    """Return ``(start, stop)`` of each batch, with no trailing batch of one."""
    starts = list(range(0, num_examples, batch_size))
    if len(starts) > 1 and num_examples - starts[-1] == 1:
        starts.pop()
    stops = [*starts[1:], num_examples]
    return list(zip(starts, stops, strict=True))
