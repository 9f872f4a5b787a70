"""Client training throughput: our client path against a plain PyTorch loop.

Both train the same model from the same weights on the same shard, on the same
device, side by side in this process, alternating (best of ``--repeats``).

- plain: the pytorch/examples shape: ``DataLoader(TensorDataset)``, SGD, cross-entropy.
- ours: what the ClientApp does each round: deserialise the received ArrayRecord
  into the model, ``task.training.train``, serialise the reply ArrayRecord.

Usage: python bench/client_training.py [--dataset digits|fashion-mnist] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from strategies.strategy import arrays_to_numpy, numpy_to_arrays
from task.datasets import TensorSplit, load_dataset
from task.models import build_model
from task.training import load_numpy_into, model_to_numpy, resolve_device, train


def plain_loop(model, split, epochs, batch_size, lr, momentum, device) -> float:
    loader = DataLoader(TensorDataset(split.x, split.y), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.to(device).train()
    started = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def client_path(model, record, split, epochs, batch_size, lr, momentum, device) -> float:
    started = time.perf_counter()
    load_numpy_into(model, arrays_to_numpy(record))
    train(
        model,
        split,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        device=device,
        seed=0,
    )
    numpy_to_arrays(model_to_numpy(model))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="simple-cnn")
    parser.add_argument("--data-dir", default="/tmp/fedcoord-bench-data")
    parser.add_argument("--examples", type=int, default=4800, help="shard size")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = resolve_device(args.device)
    data = load_dataset(args.dataset, args.data_dir, seed=0)
    reps = -(-args.examples // len(data.train))  # digits is small: repeat it up to the size
    split = TensorSplit(
        data.train.x.repeat(reps, 1, 1, 1)[: args.examples],
        data.train.y.repeat(reps)[: args.examples],
    )
    initial = build_model(args.model, data.input_shape, data.num_classes, seed=0)
    record = numpy_to_arrays(model_to_numpy(initial))
    settings = (args.epochs, args.batch_size, 0.01, 0.9, device)
    plain_model = build_model(args.model, data.input_shape, data.num_classes, seed=0)
    our_model = build_model(args.model, data.input_shape, data.num_classes, seed=0)
    plain_loop(plain_model, split, 1, args.batch_size, 0.01, 0.9, device)  # warm-up
    client_path(our_model, record, split, 1, args.batch_size, 0.01, 0.9, device)

    plain_times, our_times = [], []
    for _ in range(args.repeats):
        plain_model.load_state_dict(initial.state_dict())
        plain_times.append(plain_loop(plain_model, split, *settings))
        our_times.append(client_path(our_model, record, split, *settings))
    samples = len(split) * args.epochs
    plain_rate, our_rate = samples / min(plain_times), samples / min(our_times)
    print(
        f"client training: {args.dataset}, {args.model}, {len(split)} examples x "
        f"{args.epochs} epochs, batch {args.batch_size}, device {device}, "
        f"torch threads {torch.get_num_threads()}, best of {args.repeats}\n"
    )
    print("| path | samples/s | ratio to plain |")
    print("|---|---:|---:|")
    print(f"| plain PyTorch loop (DataLoader) | {plain_rate:,.0f} | 1.00 |")
    print(
        f"| fedcoord client path (arrays in, train, arrays out) | {our_rate:,.0f} | "
        f"{our_rate / plain_rate:.2f} |"
    )


if __name__ == "__main__":
    main()
