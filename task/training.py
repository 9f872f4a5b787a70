"""Local training and evaluation loops, device selection and weight conversion.

The loops have the shape of pytorch/examples' ``mnist/main.py`` but read
batches straight from in-memory tensors (no DataLoader) and keep running
metrics on the device, synchronising once per call, so they cost what a plain
PyTorch loop costs.
"""

import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from task.datasets import TensorSplit
from task.graphed_step import GraphedStep
from task.names import CUDA_GRAPH_CHOICES, PRECISION_CHOICES

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


def describe_device(device: torch.device, settings: object) -> str:
    """Where and how a node trains, as the operator sees it: ``cpu``, ``cuda:0 fp32 graphs``.

    ``settings`` carries ``precision`` and ``cuda_graphs`` (a RunConfig). On the CPU
    only the device is named unless bf16 was asked for.
    """
    precision = str(getattr(settings, "precision", "auto"))
    graphs = str(getattr(settings, "cuda_graphs", "auto"))
    arithmetic = "bf16" if precision == "bf16" else "fp32"
    if device.type != "cuda":
        return f"{device} bf16" if precision == "bf16" else str(device)
    return f"{device} {arithmetic}" + (" graphs" if graphs != "off" else "")


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
    precision: str = "auto",
    cuda_graphs: str = "auto",
) -> TrainResult:
    """Train ``model`` in place with SGD on ``split``.

    With ``proximal_mu > 0`` the FedProx term ``(mu / 2) * ||w - w_global||^2``
    is added to the objective, ``w_global`` being the weights at entry
    (https://arxiv.org/abs/1812.06127); its gradient ``mu * (w - w_global)`` is
    added to the parameters' gradients directly. On CUDA each full batch's step
    is captured once as a CUDA graph and replayed (:mod:`task.graphed_step`);
    the last, short batch runs eagerly.

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
    precision : str
        ``auto`` (fp32: bf16 autocast measured slower for every shipped model),
        ``fp32`` or ``bf16`` (autocast).
    cuda_graphs : str
        ``auto`` (graphs on CUDA, eager if capture fails, with a warning), ``on``
        (graphs on CUDA; a failed capture raises) or ``off``. Never on the CPU.

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

    def add_proximal_gradient() -> None:
        if anchors:
            _add_proximal_gradient(params, anchors, proximal_mu)

    graphed = _graphed_step(
        model, optimizer, data, batch_size, add_proximal_gradient, precision, cuda_graphs
    )
    for _ in range(epochs):
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        if graphed is not None:
            graphed.reset_metrics()
        order = torch.randperm(len(data), generator=generator).to(device)
        for start, stop in _batch_bounds(len(data), batch_size):
            rows = order[start:stop]
            if graphed is not None and stop - start == batch_size:
                if _graphed_or_eager(graphed, rows, cuda_graphs):
                    continue
                loss_sum += graphed.loss_sum  # its warm-up steps of this epoch
                correct += graphed.correct
                graphed = None
            x, y = data.x[rows], data.y[rows]
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, precision):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            loss.backward()
            add_proximal_gradient()
            optimizer.step()
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.argmax(dim=1) == y).sum()
        if graphed is not None:
            loss_sum += graphed.loss_sum
            correct += graphed.correct
    total_loss, total_correct = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
    return TrainResult(
        loss=total_loss / len(data),
        accuracy=total_correct / len(data),
        num_examples=len(data),
        seconds=time.perf_counter() - started,
    )


def test(
    model: nn.Module,
    split: TensorSplit,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
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
        Device to evaluate on.
    precision : str
        ``auto`` / ``fp32``, or ``bf16`` (autocast), as in :func:`train`.

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
            with _autocast(device, precision):
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


def _autocast(device: torch.device, precision: str, cache: bool = True) -> torch.autocast:
    """bf16 autocast when ``precision`` is ``bf16``; a disabled autocast otherwise.

    ``auto`` is fp32: bf16 autocast measured 0.91x fp32 for simple-cnn and 0.96x
    for resnet18 on an H200 at B=256, and slower still at small batches.
    ``cache=False`` inside a CUDA graph capture, as PyTorch requires.
    """
    return torch.autocast(
        device_type=device.type,
        dtype=torch.bfloat16,
        enabled=precision == "bf16" and device.type in ("cuda", "cpu"),
        cache_enabled=cache,
    )


def _graphed_step(  # noqa: PLR0913
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TensorSplit,
    batch_size: int,
    add_gradient_terms: Callable[[], None],
    precision: str,
    cuda_graphs: str,
) -> GraphedStep | None:
    """The captured step for this call, or None where steps run eagerly."""
    if cuda_graphs not in CUDA_GRAPH_CHOICES:
        raise ValueError(f"cuda_graphs {cuda_graphs!r}; valid: {', '.join(CUDA_GRAPH_CHOICES)}")
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision {precision!r}; valid: {', '.join(PRECISION_CHOICES)}")
    if cuda_graphs == "off" or data.x.device.type != "cuda" or len(data) < batch_size:
        return None
    return GraphedStep(
        model,
        optimizer,
        data.x,
        data.y,
        batch_size,
        add_gradient_terms,
        autocast=lambda: _autocast(data.x.device, precision, cache=False),
    )


def _graphed_or_eager(graphed: GraphedStep, rows: torch.Tensor, mode: str) -> bool:
    """Run one full batch's step on ``graphed``; False when it must go eager from now on.

    With ``auto`` a failed capture (a model with an operation a graph cannot hold,
    such as a host synchronisation) is warned about once and training goes on
    eagerly from this batch, which has not been trained on; with ``on`` it raises.
    """
    try:
        graphed.step(rows)
    except RuntimeError as error:
        if mode == "on" or graphed.graph is not None:
            raise
        warnings.warn(f"CUDA graph capture failed, training eagerly: {error}", stacklevel=3)
        return False
    return True


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
