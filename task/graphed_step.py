"""One SGD step captured as a CUDA graph and replayed: small-batch training without launch cost.

A step of a small model at a small batch (SimpleCNN, B=10) is dozens of tiny kernel
launches; on a large GPU the launches, not the arithmetic, take the time (2.4 ms a
step eager on an H200, 0.3 ms replayed). The step (batch gather, forward, loss,
backward, the FedProx gradient, the optimizer step and the running metrics) is
recorded once on static buffers and replayed for every full batch; the last, short
batch runs eagerly. The arithmetic is the eager step's, so the loss trajectory is
the eager one to float tolerance (``tests/test_training.py``, marked ``gpu``).

Capture follows PyTorch's recipe (https://pytorch.org/docs/stable/notes/cuda.html,
"Whole-network capture"): a few warm-up steps on a side stream, gradients set to
None before capture, then ``torch.cuda.graph``. The warm-up steps are real steps on
real batches, so no update is made twice or skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

# Eager steps on a side stream before capture (allocator and cuDNN warm-up, and the
# optimizer's momentum buffers, which SGD creates on its first step).
WARMUP_STEPS = 3


class GraphedStep:
    """The SGD step of one (model, optimizer, batch size), captured on first use.

    Parameters
    ----------
    model : nn.Module
        On a CUDA device, in training mode; its parameters must stay where they
        are (the graph holds their addresses).
    optimizer : torch.optim.Optimizer
        Steps ``model``'s parameters; its state must live on the device.
    features : torch.Tensor
        The node's examples on the device; batches are gathered from it by index.
    labels : torch.Tensor
        Their labels, on the device.
    batch_size : int
        Examples per captured step.
    add_gradient_terms : Callable[[], None]
        Called between backward and the optimizer step (the FedProx term); it must
        be capturable (device ops only, no host synchronisation).
    autocast : Callable[[], AbstractContextManager[object]]
        The context of the forward pass and loss (a disabled autocast for fp32;
        with ``cache_enabled=False`` for bf16, as capture requires).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        features: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        add_gradient_terms: Callable[[], None],
        autocast: Callable[[], AbstractContextManager[object]],
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.features, self.labels = features, labels
        self.batch_size = batch_size
        self.add_gradient_terms = add_gradient_terms
        self.autocast = autocast
        device = features.device
        self.rows = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._warmup_left = WARMUP_STEPS
        self._side_stream = torch.cuda.Stream(device=device)

    def reset_metrics(self) -> None:
        """Zero the running loss sum and correct count (at the start of an epoch)."""
        self.loss_sum.zero_()
        self.correct.zero_()

    def step(self, rows: torch.Tensor) -> None:
        """Train on the examples at ``rows`` (exactly ``batch_size`` indices on the device)."""
        self.rows.copy_(rows)
        if self.graph is not None:
            self.graph.replay()
        elif self._warmup_left > 0:
            self._warm_up()
        else:
            self.graph = self._capture()
            self.graph.replay()  # capture records the step; replay runs it

    def _body(self) -> None:
        x = self.features.index_select(0, self.rows)
        y = self.labels.index_select(0, self.rows)
        with self.autocast():
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
        loss.backward()
        self.add_gradient_terms()
        self.optimizer.step()
        self.loss_sum.add_(loss.detach() * self.batch_size)
        self.correct.add_((logits.argmax(dim=1) == y).sum())

    def _warm_up(self) -> None:
        current = torch.cuda.current_stream(self.features.device)
        self._side_stream.wait_stream(current)
        with torch.cuda.stream(self._side_stream):
            self.optimizer.zero_grad(set_to_none=True)
            self._body()
        current.wait_stream(self._side_stream)
        self._warmup_left -= 1

    def _capture(self) -> torch.cuda.CUDAGraph:
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body()
        return graph
