"""Synchronous FedAvg against FedBuff (mode='async') with stragglers, at equal client work.

20 simulated nodes, iid; 30% of them (6) are 5x slower: the ``client-delay`` knob
makes every node wait ``BASE_S`` seconds before it trains (a slow device) and the
slow ones ``5 * BASE_S``. Ray runs ``SLOTS`` ClientApps at once in both modes.

- sync: ``fedavg``, every node trains every round (fraction-train=1), the round
  waits for the slowest; R rounds = 20 R trainings.
- async: ``fedavg`` with FedBuff, ``concurrency`` = SLOTS trainings in flight,
  a version every ``buffer-size`` = 10 updates, polynomial staleness weight
  (exponent 0.5), ``max-staleness`` 20; 2 R versions = 20 R accepted trainings.

Reported per dataset and mode: wall time from the initial model's evaluation to
the first version/round whose central accuracy reaches the target (digits 0.95,
Fashion-MNIST 0.85), the same from the end of step 1 (round 1 / version 1, which
carries Ray's start-up of the ClientApps, 50-70 s on a 2-core machine; after it a
synchronous run has done 20 trainings, an asynchronous one 10, so this favours
sync), the whole run's wall time, and the final and best accuracy.

Usage: python bench/async.py [--datasets digits fashion-mnist] [--rounds 6 8] [--base-s 1.0]
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from server.launch.simulation import flwr_run_command, local_superlink

APP_DIR = Path(__file__).resolve().parent.parent
NODES = 20
SLOW = (2, 5, 8, 11, 14, 17)  # 30% of the partitions
SLOWDOWN = 5.0
SLOTS = 10  # ClientApps Ray runs at once (its CPU count; each ClientApp asks 1)
BUFFER = 10
TARGETS = {"digits": 0.95, "fashion-mnist": 0.85}
# Per-dataset client settings: digits' defaults (5 epochs on ~72 examples); Fashion-MNIST
# 1 epoch on 3,000 examples with batch 32, so a round's CPU work fits two cores.
CLIENT = {
    "digits": "local-epochs=5",
    "fashion-mnist": "local-epochs=1 batch-size=32 lr=0.05",
}


@dataclass
class Outcome:
    dataset: str
    mode: str
    steps: int
    trainings: int
    to_target_s: float | None
    after_first_s: float | None
    total_s: float
    final: float
    best: float


def client_delay(base_s: float) -> str:
    slow = ",".join(f"{p}={SLOWDOWN * base_s:g}" for p in SLOW)
    return f"*={base_s:g},{slow}"


def run(link, runs: Path, dataset: str, mode: str, rounds: int, base_s: float) -> Outcome:
    name = f"{dataset}-{mode}"
    steps = rounds if mode == "sync" else rounds * NODES // BUFFER
    config = (
        f"dataset='{dataset}' {CLIENT[dataset]} partitioner='iid' strategy='fedavg' "
        f"num-server-rounds={steps} min-train-nodes={NODES} fraction-evaluate=0.0 "
        f"client-delay='{client_delay(base_s)}' runs-dir='{runs}' run-name='{name}' "
        f"node-wait-timeout=300.0 mode='{mode}'"
    )
    if mode == "async":
        config += f" concurrency={SLOTS} buffer-size={BUFFER} max-staleness=20"
    command = flwr_run_command(APP_DIR, NODES, config, num_cpus=1)
    federation = command.index("--federation-config") + 1
    command[federation] += f" init-args-num-cpus={SLOTS}"
    subprocess.run(command, env=link.env(), check=True, capture_output=True, timeout=1800)
    with sqlite3.connect(runs / name / "run.db") as db:
        rows = db.execute(
            "SELECT round, ended_at, central_accuracy, accepted FROM rounds ORDER BY round"
        ).fetchall()
    start = rows[0][1]  # the initial model's evaluation; the first message follows it
    reached = [r for r in rows[1:] if r[2] >= TARGETS[dataset]]
    return Outcome(
        dataset,
        mode,
        len(rows) - 1,
        sum(r[3] for r in rows[1:]),
        reached[0][1] - start if reached else None,
        reached[0][1] - rows[1][1] if reached else None,
        rows[-1][1] - start,
        rows[-1][2],
        max(r[2] for r in rows[1:]),
    )


def print_table(outcomes: list[Outcome]) -> None:
    print(
        "| dataset | mode | rounds / versions | accepted trainings | s to target "
        "| s to target after step 1 | total s | final accuracy | best accuracy |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for o in outcomes:
        target = "not reached" if o.to_target_s is None else f"{o.to_target_s:.1f}"
        after = "-" if o.after_first_s is None else f"{o.after_first_s:.1f}"
        print(
            f"| {o.dataset} (target {TARGETS[o.dataset]}) | {o.mode} | {o.steps} | {o.trainings} "
            f"| {target} | {after} | {o.total_s:.1f} | {o.final:.4f} | {o.best:.4f} |"
        )
    by_dataset: dict[str, dict[str, Outcome]] = {}
    for o in outcomes:
        by_dataset.setdefault(o.dataset, {})[o.mode] = o
    for dataset, modes in by_dataset.items():
        sync, fedbuff = modes.get("sync"), modes.get("async")
        if sync and fedbuff and sync.after_first_s and fedbuff.after_first_s:
            print(
                f"{dataset}: async reaches {TARGETS[dataset]} in "
                f"{fedbuff.to_target_s / sync.to_target_s:.2f}x the synchronous wall time "  # type: ignore[operator]
                f"({fedbuff.after_first_s / sync.after_first_s:.2f}x after step 1); "
                f"final accuracy {100 * (fedbuff.final - sync.final):+.1f} points"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion-mnist"])
    parser.add_argument("--rounds", nargs="+", type=int, default=[6, 6], help="sync rounds")
    parser.add_argument("--base-s", type=float, default=1.0, help="a fast node's delay")
    args = parser.parse_args()
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        with local_superlink(Path(tmp) / "flwr_home") as link:
            for dataset, rounds in zip(args.datasets, args.rounds, strict=False):
                for mode in ("sync", "async"):
                    started = time.time()
                    outcomes.append(run(link, runs, dataset, mode, rounds, args.base_s))
                    print(f"{dataset} {mode}: {time.time() - started:.0f}s", flush=True)
    print_table(outcomes)


if __name__ == "__main__":
    main()
