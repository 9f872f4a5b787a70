"""Wall time per round: fedcoord's coordinator against Flower's own FedAvg ``Strategy.start``.

Both run in simulation on one SuperLink, one after the other, with the same
nodes, data, model, ClientApp, client training, federated and central
evaluation. Flower's run uses a bench-only ServerApp (``bench/flower_baseline``)
built into a temporary app folder next to a copy of the main app's run config.
Per-round time is the mean gap between consecutive central evaluations over
rounds 2..N (round 1 carries Ray's start-up in both).

Usage: python bench/coordinator_round_time.py [--supernodes 10] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path

from server.launch.simulation import flwr_run_command, local_superlink

APP_DIR = Path(__file__).resolve().parent.parent
BASELINE_DIR = Path(__file__).resolve().parent / "flower_baseline"

BASELINE_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedcoord-flower-baseline"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = []

[tool.flwr.app]
publisher = "fedcoord"

[tool.flwr.app.components]
serverapp = "baseline_server:app"
clientapp = "client.app:app"

"""


def build_baseline_app(folder: Path) -> Path:
    """A Flower app folder: the baseline ServerApp and the main app's run config."""
    main = (APP_DIR / "pyproject.toml").read_text()
    config = main[main.index("[tool.flwr.app.config]") : main.index("[tool.ruff]")]
    folder.mkdir(parents=True)
    shutil.copy(BASELINE_DIR / "baseline_server.py", folder / "baseline_server.py")
    (folder / "pyproject.toml").write_text(BASELINE_PYPROJECT + config + "bench-num-nodes = 2\n")
    return folder


def mean_gap(times: list[float]) -> float:
    gaps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
    return sum(gaps) / len(gaps)


def run_pair(link, tmp: Path, baseline_app: Path, args, index: int) -> tuple[list, list]:
    """One fedcoord run and one Flower run, back to back; their round rows."""
    runs = tmp / "runs"
    common = f"num-server-rounds={args.rounds} local-epochs={args.local_epochs} runs-dir='{runs}'"
    for app, config in (
        (APP_DIR, f"{common} run-name='ours-{index}'"),
        (baseline_app, f"{common} run-name='flower-{index}' bench-num-nodes={args.supernodes}"),
    ):
        command = flwr_run_command(app, args.supernodes, config, num_cpus=1)
        subprocess.run(command, env=link.env(), check=True, capture_output=True)
    with sqlite3.connect(runs / f"ours-{index}" / "run.db") as db:
        ours = db.execute(
            "SELECT ended_at, central_accuracy, metrics_json FROM rounds ORDER BY round"
        ).fetchall()
    flower = json.loads((runs / f"flower-{index}" / "flower_rounds.json").read_text())
    return ours, flower


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--supernodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=2, help="alternating runs of each")
    args = parser.parse_args()
    print(
        f"round time: {args.supernodes} nodes, {args.rounds} rounds, digits, simple-cnn, "
        f"{args.local_epochs} local epochs, simulation; mean over rounds 2..{args.rounds}\n"
    )
    print("| pair | Flower FedAvg `Strategy.start` s/round | fedcoord s/round | ratio |")
    print("|---|---:|---:|---:|")
    totals = [0.0, 0.0]
    phases: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        baseline_app = build_baseline_app(tmp / "baseline_app")
        with local_superlink(tmp / "flwr_home") as link:
            for index in range(args.pairs):
                ours, flower = run_pair(link, tmp, baseline_app, args, index)
                ours_round = mean_gap([row[0] for row in ours])
                flower_round = mean_gap([row[1] for row in flower])
                totals[0] += flower_round
                totals[1] += ours_round
                phases += [json.loads(row[2]) for row in ours[2:]]
                print(
                    f"| {index + 1} | {flower_round:.3f} | {ours_round:.3f} | "
                    f"{ours_round / flower_round:.2f} |"
                )
    print(
        f"| mean | {totals[0] / args.pairs:.3f} | {totals[1] / args.pairs:.3f} | "
        f"{totals[1] / totals[0]:.2f} |"
    )
    print(f"\nfinal central accuracy: fedcoord {ours[-1][1]:.4f}, Flower {flower[-1][2]:.4f}")
    print("fedcoord round, mean seconds by phase (rounds 2..N):")
    for key in (
        "seconds-train-phase",
        "seconds-aggregation",
        "seconds-central-eval",
        "seconds-federated-eval",
    ):
        print(f"  {key}: {sum(p[key] for p in phases) / len(phases):.3f}")


if __name__ == "__main__":
    main()
