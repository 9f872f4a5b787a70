"""Simulation at scale: 100 and 1,000 nodes, 10 sampled per round, against Flower's FedAvg.

The FedAvg paper's client settings (McMahan et al., https://arxiv.org/abs/1602.05629):
Fashion-MNIST (Debian's copy), iid, every example of a node trains
(``local-test-fraction=0``: 600 examples a node at 100 nodes, 60 at 1,000),
E=5 local epochs, B=10, lr 0.1, momentum 0, 10 nodes sampled per round. At 1,000
nodes the local epochs are 50, so that each sampled node does the same 300 SGD steps
as at 100 nodes and the two round times compare the server and simulation, not the
amount of training.
Each configuration runs on one SuperLink with the same data, model and ClientApp,
once with fedcoord's ServerApp and once with Flower's own ``FedAvg.start``
(``bench/flower_baseline``). Reported per round (mean over rounds 2..N; round 1
carries Ray's start-up): train phase, federated evaluation, total; the start-up
before round 1; and the peak RSS of the SuperLink's whole process tree (SuperLink,
simulation, Ray, ClientApp workers), sampled every 0.2 s.

Usage: python bench/scale.py [--nodes 100 1000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator_round_time import build_baseline_app

from server.launch.processes import descendants
from server.launch.simulation import flwr_run_command, local_superlink

APP_DIR = Path(__file__).resolve().parent.parent
PAPER_CLIENT = (
    "dataset='fashion-mnist' partitioner='iid' batch-size=10 lr=0.1 momentum=0.0 min-train-nodes=10"
)
SAMPLED = 10
TRAIN_EXAMPLES = 60_000
PAPER_EPOCHS, PAPER_EXAMPLES_PER_NODE = 5, 600


def client_config(nodes: int) -> str:
    """The paper's client settings with the same SGD steps per node at any node count.

    Fashion-MNIST has 60,000 training examples: 600 a node at 100 nodes, 60 at 1,000.
    So that a round does the same client work at both sizes (300 steps of B=10), the
    local epochs scale with the node count: E=5 at 100 nodes, E=50 at 1,000.
    """
    examples = TRAIN_EXAMPLES // nodes
    epochs = max(1, round(PAPER_EPOCHS * PAPER_EXAMPLES_PER_NODE / examples))
    return f"{PAPER_CLIENT} local-epochs={epochs}"


class TreeRss:
    """Peak resident memory of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid, self.interval_s, self.peak_bytes = pid, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = sum(_rss_bytes(pid) for pid in [self.pid, *descendants(self.pid)])
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval_s)


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class RunResult:
    """One run's per-round figures (mean over rounds 2..N) and its peak memory."""

    label: str
    nodes: int
    round_s: float
    train_s: float | None
    federated_s: float | None
    startup_s: float
    peak_rss_gib: float
    accuracy: float


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run_ours(link, runs: Path, nodes: int, rounds: int, evaluate: float) -> RunResult:
    name = f"ours-{nodes}-eval{evaluate:g}"
    # Federated evaluation needs local test splits: then 20% of each node's examples
    # are kept back (480 train + 120 test at 100 nodes).
    test_fraction = 0.2 if evaluate > 0 else 0.0
    config = (
        f"{client_config(nodes)} num-server-rounds={rounds} fraction-train={SAMPLED / nodes} "
        f"fraction-evaluate={evaluate} local-test-fraction={test_fraction} "
        f"runs-dir='{runs}' run-name='{name}'"
    )
    launched, peak = _run(link, APP_DIR, nodes, config)
    with sqlite3.connect(runs / name / "run.db") as db:
        rows = db.execute(
            "SELECT started_at, ended_at, metrics_json, central_accuracy FROM rounds "
            "WHERE round > 0 ORDER BY round"
        ).fetchall()
        state, message = db.execute("SELECT state, message FROM run WHERE id = 1").fetchone()
    if len(rows) < rounds:
        raise SystemExit(f"scale: run {name} ended {state} after {len(rows)} round(s): {message}")
    metrics = [json.loads(row[2]) for row in rows[1:]]
    return RunResult(
        f"fedcoord, fraction-evaluate={evaluate:g}",
        nodes,
        _mean([b[1] - a[1] for a, b in zip(rows, rows[1:], strict=False)]),
        _mean([m["seconds-train-phase"] for m in metrics]),
        _mean([m["seconds-federated-eval"] for m in metrics]),
        rows[0][0] - launched,
        peak,
        rows[-1][3],
    )


def run_flower(link, runs: Path, baseline: Path, nodes: int, rounds: int) -> RunResult:
    name = f"flower-{nodes}"
    config = (
        f"{client_config(nodes)} num-server-rounds={rounds} fraction-train={SAMPLED / nodes} "
        f"fraction-evaluate=0.0 local-test-fraction=0.0 runs-dir='{runs}' run-name='{name}' "
        f"bench-num-nodes={nodes}"
    )
    launched, peak = _run(link, baseline, nodes, config)
    times = json.loads((runs / name / "flower_rounds.json").read_text())
    ends = [t[1] for t in times]  # round 0 (initial model), 1, ..., N
    return RunResult(
        "Flower FedAvg.start, fraction-evaluate=0",
        nodes,
        _mean([b - a for a, b in zip(ends[1:], ends[2:], strict=False)]),
        None,
        None,
        ends[0] - launched,
        peak,
        times[-1][2],
    )


def _run(link, app: Path, nodes: int, config: str) -> tuple[float, float]:
    """Run one app to completion; return its launch time and peak tree RSS in GiB."""
    command = flwr_run_command(app, nodes, config, num_cpus=1)
    launched = time.time()
    with TreeRss(link.process.pid) as rss:
        subprocess.run(command, env=link.env(), check=True, capture_output=True)
    return launched, rss.peak_bytes / 2**30


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(results: list[RunResult]) -> None:
    print(
        "| nodes | server | s/round | train phase s | federated eval s | start-up s "
        "| peak RSS GiB | accuracy |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.nodes} | {r.label} | {r.round_s:.2f} | {_fmt(r.train_s)} | "
            f"{_fmt(r.federated_s)} | {r.startup_s:.1f} | {r.peak_rss_gib:.2f} | "
            f"{r.accuracy:.4f} |"
        )


def print_targets(results: list[RunResult]) -> None:
    by = {(r.nodes, r.label): r for r in results}
    off, flower = "fedcoord, fraction-evaluate=0", "Flower FedAvg.start, fraction-evaluate=0"
    nodes = sorted({r.nodes for r in results})
    print()
    for n in nodes:
        if (n, off) in by and (n, flower) in by:
            ratio = by[n, off].round_s / by[n, flower].round_s
            print(f"- {n} nodes, evaluation off: fedcoord / Flower round time = {ratio:.2f}")
        if (n, "fedcoord, fraction-evaluate=1") in by:
            run = by[n, "fedcoord, fraction-evaluate=1"]
            share = (run.federated_s or 0) / (run.train_s or 1)
            print(f"- {n} nodes, fraction-evaluate=1: evaluation / train phase = {share:.2f}")
    if len(nodes) == 2 and all((n, off) in by for n in nodes):
        small, large = by[nodes[0], off], by[nodes[1], off]
        print(
            f"- {nodes[1]} vs {nodes[0]} nodes (evaluation off): round time "
            f"{large.round_s / small.round_s:.2f}x, peak RSS "
            f"{large.peak_rss_gib / small.peak_rss_gib:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    print(
        "scale: Fashion-MNIST, iid, simple-cnn, E=5 (50 at 1,000 nodes), B=10, lr 0.1, "
        f"momentum 0, "
        f"{SAMPLED} nodes sampled per round, {args.rounds} rounds, simulation, "
        "1 CPU per ClientApp; means over rounds 2..N\n"
    )
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        baseline = build_baseline_app(tmp / "baseline_app")
        with local_superlink(tmp / "flwr_home") as link:
            for nodes in args.nodes:
                results.append(run_flower(link, tmp / "runs", baseline, nodes, args.rounds))
                results.append(run_ours(link, tmp / "runs", nodes, args.rounds, 0.0))
                if nodes == min(args.nodes):
                    results.append(run_ours(link, tmp / "runs", nodes, args.rounds, 1.0))
                print_table(results[-3:] if nodes == min(args.nodes) else results[-2:])
    print()
    print_table(results)
    print_targets(results)


if __name__ == "__main__":
    main()
