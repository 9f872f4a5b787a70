"""Where the wall time of a simulation run goes.

Runs the demo (10 nodes, 5 rounds, defaults) on a fresh SuperLink and splits the
wall time from launch to exit into: Flower start-up (SuperLink, simulation
process, ServerApp until it opens its run directory), the train phase of each
round (push, client training, replies), streaming aggregation (folding replies
and applying the update; it overlaps the train phase), central evaluation,
federated evaluation, and the remainder (recording, shutdown). Round 1's train
phase includes starting the Ray actors that host the ClientApps.

Usage: python bench/demo_breakdown.py [--supernodes 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

from server.launch.simulation import flwr_run_command, local_superlink

APP_DIR = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--supernodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = Path(tmp) / "runs"
        launched = time.time()
        with local_superlink(Path(tmp) / "flwr_home") as link:
            config = f"num-server-rounds={args.rounds} runs-dir='{runs_dir}' run-name='bench'"
            command = flwr_run_command(APP_DIR, args.supernodes, config, num_cpus=1)
            subprocess.run(command, env=link.env(), check=True, capture_output=True)
        ended = time.time()
        db = sqlite3.connect(runs_dir / "bench" / "run.db")
        created = db.execute("SELECT created_at FROM run").fetchone()[0]
        rows = db.execute(
            "SELECT round, duration_s, metrics_json, central_accuracy FROM rounds "
            "WHERE round > 0 ORDER BY round"
        ).fetchall()
    total = ended - launched
    metrics = [json.loads(r[2]) for r in rows]
    parts = {
        "Flower start-up (SuperLink, simulation, ServerApp)": created - launched,
        "train phase, round 1 (includes Ray actor start-up)": metrics[0]["seconds-train-phase"],
        f"train phase, rounds 2-{len(rows)}": sum(m["seconds-train-phase"] for m in metrics[1:]),
        "  of which streaming aggregation (overlaps)": sum(
            m["seconds-aggregation"] for m in metrics
        ),
        "central evaluation": sum(m["seconds-central-eval"] for m in metrics),
        "federated evaluation": sum(m["seconds-federated-eval"] for m in metrics),
    }
    accounted = sum(v for k, v in parts.items() if not k.startswith("  "))
    parts["other (initial evaluation, recording, shutdown)"] = total - accounted
    print(
        f"demo breakdown: {args.supernodes} nodes, {len(rows)} rounds, digits, simple-cnn; "
        f"final central accuracy {rows[-1][3]:.4f}\n"
    )
    print("| part | seconds | share |")
    print("|---|---:|---:|")
    for name, seconds in parts.items():
        print(f"| {name} | {seconds:.2f} | {100 * seconds / total:.0f}% |")
    print(f"| total wall time | {total:.2f} | 100% |")
    mean_round = sum(r[1] for r in rows[1:]) / max(1, len(rows) - 1)
    print(f"\nmean round after the first: {mean_round:.2f} s")


if __name__ == "__main__":
    main()
