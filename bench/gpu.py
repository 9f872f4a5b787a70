"""GPU benchmark: one client update in each training variant, and the FedAvg-paper loop.

Runs on a GPU host with torch, torchvision, numpy and scikit-learn only (no flwr, no
Ray): it imports ``task/`` (models, data, training) and ``strategies/aggregation``
(pure numpy), nothing else of the project.

1. One client update, side by side in one process (alternating, best of
   ``--repeats``): SimpleCNN (1.66M parameters), 600 examples, E=5, B=10, i.e. 300
   SGD steps, lr 0.1, in each variant:
   - ``bf16 eager``: the path shipped before (bf16 autocast, one launch per kernel);
   - ``fp32 eager``;
   - ``fp32 CUDA graph``: the default now (``precision=auto``, ``cuda-graphs=auto``);
   - ``cpu fp32``: the same update on the host's CPU, for scale.
2. The FedAvg paper's MNIST setting (McMahan et al. 2017,
   https://arxiv.org/abs/1602.05629): 100 IID clients of 600 examples, C=0.1 (10 a
   round), E=5, B=10, lr 0.1, SimpleCNN, FedAvg by examples; each round's clients
   trained one after another on the GPU, the new model evaluated on the test set.
   Prints the round that reached ``--target`` accuracy and the seconds per round.
   MNIST where a copy exists (``--data-dir`` holding torchvision's ``MNIST/raw``),
   otherwise Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (there the
   target is not reached: the table shows the accuracy after ``--rounds``).

Usage::

    python bench/gpu.py [--repeats 5] [--rounds 20] [--data-dir DIR] [--device cuda:0]

Exits 2 with one line on a machine without CUDA (``--device cpu`` runs the same
code on the CPU, e.g. to try the script: ``--rounds 1 --repeats 1``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from strategies.aggregation import WeightedMeanAggregator
from task import training
from task.datasets import (
    FASHION_MNIST_SYSTEM_DIRS,
    DatasetSplits,
    DatasetUnavailableError,
    TensorSplit,
    load_dataset,
)
from task.models import build_model

STEPS_SHAPE = (1, 28, 28)
CLIENT_EXAMPLES, LOCAL_EPOCHS, BATCH_SIZE, LR = 600, 5, 10, 0.1
VARIANTS: dict[str, dict[str, str]] = {
    "bf16 eager (shipped before)": {"precision": "bf16", "cuda_graphs": "off"},
    "fp32 eager": {"precision": "fp32", "cuda_graphs": "off"},
    "fp32 CUDA graph (default)": {"precision": "auto", "cuda_graphs": "auto"},
}


def client_update(
    device: torch.device, split: TensorSplit, weights: dict[str, np.ndarray], **options: str
) -> tuple[float, dict[str, np.ndarray], int]:
    """Seconds for one client's local training from ``weights``, its new weights, examples."""
    model = build_model("simple-cnn", STEPS_SHAPE, 10, seed=0)
    training.load_numpy_into(model, weights)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = training.train(
        model,
        split,
        epochs=LOCAL_EPOCHS,
        batch_size=BATCH_SIZE,
        lr=LR,
        momentum=0.0,
        device=device,
        seed=0,
        **options,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, training.model_to_numpy(model), result.num_examples


def bench_client_update(device: torch.device, repeats: int) -> list[str]:
    """The table of one client update in each variant, best of ``repeats``."""
    generator = torch.Generator().manual_seed(0)
    split = TensorSplit(
        torch.rand((CLIENT_EXAMPLES, *STEPS_SHAPE), generator=generator),
        torch.randint(0, 10, (CLIENT_EXAMPLES,), generator=generator),
    )
    weights = training.model_to_numpy(build_model("simple-cnn", STEPS_SHAPE, 10, seed=0))
    runs: dict[str, tuple[torch.device, dict[str, str]]] = {
        name: (device, options) for name, options in VARIANTS.items()
    }
    if device.type == "cuda":
        runs["cpu fp32"] = (torch.device("cpu"), {"precision": "fp32", "cuda_graphs": "off"})
    for target, options in runs.values():  # warm-up: cuDNN, allocator, first capture
        client_update(target, split, weights, **options)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (target, options) in runs.items():
            times[name].append(client_update(target, split, weights, **options)[0])
    shipped = min(times[next(iter(VARIANTS))])
    steps = LOCAL_EPOCHS * CLIENT_EXAMPLES // BATCH_SIZE
    lines = [
        f"One client update: SimpleCNN, {steps} SGD steps at B={BATCH_SIZE} "
        f"({repeats} repeats, best)",
        "",
        "| variant | seconds | ms a step | speed-up over bf16 eager |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds in times.items():
        best = min(seconds)
        lines.append(f"| {name} | {best:.3f} | {1000 * best / steps:.2f} | {shipped / best:.1f}x |")
    return lines


def iid_clients(train: TensorSplit, clients: int, per_client: int, seed: int) -> list[TensorSplit]:
    """``clients`` disjoint IID shards of ``per_client`` examples each."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    shards = order[: clients * per_client].reshape(clients, per_client)
    return [TensorSplit(train.x[rows], train.y[rows]) for rows in shards]


def fedavg_paper(
    device: torch.device, splits: DatasetSplits, rounds: int, target: float
) -> list[str]:
    """FedAvg on 100 IID clients, 10 a round, until ``target`` accuracy or ``rounds``."""
    clients = iid_clients(splits.train, 100, CLIENT_EXAMPLES, seed=0)
    rng = np.random.default_rng(0)
    weights = training.model_to_numpy(build_model("simple-cnn", splits.input_shape, 10, seed=0))
    evaluator = build_model("simple-cnn", splits.input_shape, 10, seed=0)
    test = training.move_split(splits.test, device)
    reached, durations, accuracy = None, [], 0.0
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        aggregator = WeightedMeanAggregator()
        names = list(weights)
        for index in rng.choice(len(clients), size=10, replace=False):
            _, new, examples = client_update(device, clients[index], weights)
            aggregator.add([new[name] - weights[name] for name in names], examples)
        delta = aggregator.result()
        weights = {name: weights[name] + step for name, step in zip(names, delta, strict=True)}
        training.load_numpy_into(evaluator, weights)
        accuracy = training.test(evaluator, test, batch_size=1000, device=device).accuracy
        durations.append(time.perf_counter() - started)
        print(f"  round {server_round}: accuracy {accuracy:.4f}", file=sys.stderr, flush=True)
        if reached is None and accuracy >= target:
            reached = server_round
            break
    later = durations[1:] or durations
    return [
        f"FedAvg paper setting on {splits.name}: 100 IID clients of {CLIENT_EXAMPLES}, 10 a "
        f"round, E={LOCAL_EPOCHS}, B={BATCH_SIZE}, lr {LR}, SimpleCNN",
        "",
        "| rounds run | accuracy | target | round reaching it | s a round (median, round 2 on) |",
        "|---:|---:|---:|---:|---:|",
        f"| {len(durations)} | {accuracy:.4f} | {target:.2f} | {reached or '-'} | "
        f"{statistics.median(later):.2f} |",
    ]


def load_paper_data(data_dir: Path | None) -> DatasetSplits | None:
    """MNIST where a copy exists, else Fashion-MNIST; never downloads.

    Fashion-MNIST's ``*-ubyte.gz`` files are looked for in ``DATA_DIR/fashion-mnist``
    (where ``tools/gpu_bundle.sh`` puts them) and in Debian's folder.
    """
    root = (data_dir or Path.home() / ".fedcoord" / "data").expanduser().resolve()
    system_dirs = (root / "fashion-mnist", *FASHION_MNIST_SYSTEM_DIRS)
    for name in ("mnist", "fashion-mnist"):
        try:
            return load_dataset(name, root, 0, False, system_dirs=system_dirs)
        except DatasetUnavailableError:
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    """Print both tables; exit 2 where the device is not there."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--repeats", type=int, default=5, help="client updates per variant")
    parser.add_argument("--rounds", type=int, default=20, help="most FedAvg rounds (default 20)")
    parser.add_argument("--target", type=float, default=0.99, help="test accuracy to reach")
    parser.add_argument("--data-dir", type=Path, default=None, help="torchvision's MNIST/raw")
    args = parser.parse_args(argv)
    try:
        device = training.resolve_device(args.device)
    except ValueError as error:
        print(f"bench/gpu.py: {error}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}\n")
    sections: list[Callable[[], list[str]]] = [lambda: bench_client_update(device, args.repeats)]
    splits = load_paper_data(args.data_dir)
    if splits is not None:
        sections.append(lambda: fedavg_paper(device, splits, args.rounds, args.target))
    else:
        print("no MNIST or Fashion-MNIST here: FedAvg paper loop skipped\n")
    for section in sections:
        print("\n".join(section()) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
