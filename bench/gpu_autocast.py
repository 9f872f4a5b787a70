"""bf16 autocast against fp32 on CUDA: samples/s of task.training.train on random data.

Trains simple-cnn (1x28x28) and resnet18 (3x32x32) side by side in one process,
alternating, best of ``--repeats``. Needs a CUDA device; exits 2 with a message
where there is none.

Usage: python bench/gpu_autocast.py [--examples 20000] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from task import training
from task.datasets import TensorSplit
from task.models import build_model


def random_split(shape: tuple[int, int, int], examples: int) -> TensorSplit:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((examples, *shape), generator=generator)
    return TensorSplit(x, torch.randint(0, 10, (examples,), generator=generator))


def timed_train(name: str, shape, split: TensorSplit, batch_size: int, bf16: bool) -> float:
    model = build_model(name, shape, 10, seed=0)
    device = torch.device("cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    training.train(
        model,
        split,
        epochs=1,
        batch_size=batch_size,
        lr=0.01,
        momentum=0.9,
        device=device,
        seed=0,
        precision="bf16" if bf16 else "fp32",
        cuda_graphs="off",  # autocast alone, as measured before graphs
    )
    torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: run this on a machine with a GPU", file=sys.stderr)
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| model | input | fp32 samples/s | bf16 autocast samples/s | speed-up |")
    print("|---|---|---:|---:|---:|")
    for name, shape in (("simple-cnn", (1, 28, 28)), ("resnet18", (3, 32, 32))):
        split = random_split(shape, args.examples)
        timed_train(name, shape, split, args.batch_size, bf16=True)  # warm-up, cudnn autotune
        fp32, bf16 = [], []
        for _ in range(args.repeats):
            fp32.append(timed_train(name, shape, split, args.batch_size, bf16=False))
            bf16.append(timed_train(name, shape, split, args.batch_size, bf16=True))
        rate32, rate16 = args.examples / min(fp32), args.examples / min(bf16)
        print(
            f"| {name} | {'x'.join(map(str, shape))} | {rate32:,.0f} | {rate16:,.0f} | "
            f"{rate16 / rate32:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
