"""Robustness of the aggregation strategies to Byzantine clients.

Runs the app in simulation on digits with 10 clients for 5 rounds (the demo's
defaults otherwise), three of them Byzantine (partitions 0, 1, 2), under two
attacks from ``client/byzantine.py``:

- ``flip``: each attacker replies ``received - 10 * (its honest update)``;
- ``noise``: each attacker adds Gaussian noise of 100x its honest update's norm.

For every strategy it prints the final central accuracy of a clean run and of
both attacked runs as a markdown table. All runs share one SuperLink, started
and stopped here by PID; ``--concurrency`` runs go at once.

Strategy settings: ``krum`` with ``num-malicious=3`` (n = 10 >= 2f + 3);
``trimmed-mean`` with ``trim-beta=0.3``, so that the 3 highest and 3 lowest of
10 values are cut (the default 0.1 cuts one of each and cannot hold off three
attackers); ``clipped`` with ``--clip-norm`` (default: the run config's 1.0).
``--measure-norms`` prints the honest update norms of a clean in-process FedAvg
run first, the basis for choosing a clip norm.

Usage: python bench/robustness.py [--rounds 5] [--concurrency 2] [--clip-norm 1.0]
       [--measure-norms] [--strategies fedavg,clipped,...]
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.launch.simulation import LocalSuperLink, flwr_run_command, local_superlink  # noqa: E402

APP_DIR = Path(__file__).resolve().parent.parent
SUPERNODES = 10
BYZANTINE_PARTITIONS = "0,1,2"
SCENARIOS = ("clean", "flip", "noise")
STRATEGIES: dict[str, dict[str, object]] = {
    "fedavg": {},
    "mean": {},
    "clipped": {},  # clip-norm from --clip-norm
    "median": {},
    "trimmed-mean": {"trim-beta": 0.3},
    "krum": {"num-malicious": 3},
    "fedmedian": {},
}


@dataclass(frozen=True)
class Job:
    strategy: str
    scenario: str

    @property
    def run_name(self) -> str:
        return f"{self.strategy}-{self.scenario}"


def run_config(job: Job, rounds: int, clip_norm: float, runs_dir: Path) -> str:
    settings: dict[str, object] = {
        "strategy": job.strategy,
        "num-server-rounds": rounds,
        "run-name": job.run_name,
        "runs-dir": str(runs_dir),
        **STRATEGIES[job.strategy],
    }
    if job.strategy == "clipped":
        settings["clip-norm"] = clip_norm
    if job.scenario != "clean":
        settings["byzantine-partitions"] = BYZANTINE_PARTITIONS
        settings["byzantine-mode"] = job.scenario
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in settings.items())


def final_accuracy(run_dir: Path) -> float:
    with sqlite3.connect(run_dir / "run.db") as db:
        row = db.execute("SELECT central_accuracy FROM rounds ORDER BY round DESC").fetchone()
    return float(row[0])


def run_job(link: LocalSuperLink, job: Job, rounds: int, clip_norm: float, runs_dir: Path) -> float:
    config = run_config(job, rounds, clip_norm, runs_dir)
    command = flwr_run_command(APP_DIR, SUPERNODES, config, num_cpus=1)
    result = subprocess.run(command, env=link.env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"{job.run_name} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return final_accuracy(runs_dir / job.run_name)


def measure_honest_norms(rounds: int) -> None:
    """Print per-round L2 norms of honest updates in a clean in-process FedAvg run."""
    import numpy as np
    import torch

    from client.shard import load_node_data
    from strategies.aggregation import compute_update_norm, make_aggregator
    from task.config import parse_run_config
    from task.models import build_model
    from task.training import load_numpy_into, model_to_numpy, train

    config = parse_run_config({})
    shards = [
        load_node_data(config, {"partition-id": i, "num-partitions": SUPERNODES})
        for i in range(SUPERNODES)
    ]
    model = build_model(config.model, shards[0].input_shape, shards[0].num_classes, config.seed)
    global_arrays = model_to_numpy(model)
    print("| round | honest update norm: min | median | max |\n|---|---|---|---|")
    for server_round in range(1, rounds + 1):
        aggregator, norms = make_aggregator("fedavg"), []
        for shard in shards:
            load_numpy_into(model, global_arrays)
            result = train(
                model,
                shard.train,
                epochs=config.local_epochs,
                batch_size=config.batch_size,
                lr=config.lr,
                momentum=config.momentum,
                device=torch.device("cpu"),
                seed=config.seed + server_round * 1000 + shard.partition_id,
            )
            trained = model_to_numpy(model)
            update = [trained[name] - global_arrays[name] for name in global_arrays]
            norms.append(compute_update_norm(update))
            aggregator.add(update, result.num_examples)
        delta = aggregator.result()
        global_arrays = {k: v + d for (k, v), d in zip(global_arrays.items(), delta, strict=True)}
        print(f"| {server_round} | {min(norms):.2f} | {np.median(norms):.2f} | {max(norms):.2f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=2, help="simulations at once")
    parser.add_argument("--clip-norm", type=float, default=1.0, help="clip-norm of 'clipped'")
    parser.add_argument("--measure-norms", action="store_true", help="print honest norms first")
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES), help="comma-separated subset to run"
    )
    args = parser.parse_args()
    chosen = [name for name in args.strategies.split(",") if name]
    unknown = sorted(set(chosen) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; valid: {', '.join(STRATEGIES)}")
    if args.measure_norms:
        measure_honest_norms(args.rounds)
    jobs = [Job(strategy, scenario) for strategy in chosen for scenario in SCENARIOS]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = Path(tmp) / "runs"
        with (
            local_superlink(Path(tmp) / "flwr_home") as link,
            ThreadPoolExecutor(max_workers=args.concurrency) as pool,
        ):
            futures = {
                job: pool.submit(run_job, link, job, args.rounds, args.clip_norm, runs_dir)
                for job in jobs
            }
            accuracy = {job: future.result() for job, future in futures.items()}
    print(
        f"digits, {SUPERNODES} clients, {args.rounds} rounds, Byzantine partitions "
        f"{BYZANTINE_PARTITIONS}; final central accuracy ({time.time() - started:.0f} s)\n"
    )
    print("| strategy | settings | clean | flip | noise |\n|---|---|---|---|---|")
    for strategy in chosen:
        settings = STRATEGIES[strategy]
        shown = {**settings, **({"clip-norm": args.clip_norm} if strategy == "clipped" else {})}
        text = " ".join(f"{k}={v}" for k, v in shown.items()) or "defaults"
        cells = " | ".join(f"{accuracy[Job(strategy, s)]:.4f}" for s in SCENARIOS)
        print(f"| {strategy} | {text} | {cells} |")


if __name__ == "__main__":
    main()
