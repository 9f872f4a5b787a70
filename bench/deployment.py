"""Wall time per round on a real (loopback) deployment: fedcoord against Flower's FedAvg.

Starts a SuperLink (TLS, node authentication) and 3 SuperNodes on this machine
with ``deploy.local_cluster`` (each node one training thread), then runs on the
same SuperLink and nodes, one after the other:

- fedcoord's ServerApp (the coordinator: pushes, pulls replies every 50 ms, folds
  them in as they arrive);
- Flower's own ``FedAvg.start`` (``bench/flower_baseline``, as in
  bench/coordinator_round_time.py) with the same ClientApp, model, data and
  evaluation (central + federated, every round).

The workload is tiny (digits, simple-cnn, 1 local epoch) so that the rounds
measure the protocol, not the training. A round's wall time is the time between
the ends of consecutive rounds (train, aggregation, central and federated
evaluation), round 1 excluded (it loads data and warms up).

``--stock`` repeats both on SuperNodes as Flower starts them by default (a new
``flwr-clientapp`` process per message, 3 s idle poll), for the node-side effect.

The SuperLink is started as ``python -m deploy superlink`` does: with its
database, on loopback behind its nginx proxy (the public port); ``--in-memory``
starts it without a database, ``--no-proxy`` without the proxy (Flower's port
itself), and ``--compare-proxy`` measures the warm nodes both ways. The nodes
allow exactly the two app builds submitted (``--allow-app``).

Usage: python bench/deployment.py [--rounds 8] [--stock] [--in-memory] [--fast-server-pull]
       [--no-proxy | --compare-proxy]
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import statistics
import tempfile
from pathlib import Path

from coordinator_round_time import build_baseline_app

from deploy.apps import app_hash
from deploy.local_cluster import PROJECT_DIR, LocalDeployment, snapshot_app
from server import object_pull

NODES = 3
# --fast-server-pull: Flower's HttpGrid.pull_messages fetches a reply's objects with a
# 1 s, then 2 s, ... backoff; fedcoord's ServerApp retries after 20 ms
# (server/object_pull.py). This gives Flower's ServerApp the same short backoff, to
# separate that effect from the coordinator's.
SERVERAPP_PULL_PATCH = f"""import functools, sys
if sys.argv and sys.argv[0].endswith("flwr-serverapp"):
    from flwr.superlink.grid import http_grid
    http_grid.pull_objects = functools.partial(
        http_grid.pull_objects,
        initial_backoff={object_pull.INITIAL_BACKOFF_S!r},
        backoff_cap={object_pull.BACKOFF_CAP_S!r},
    )
"""
WORKLOAD = {"dataset": "digits", "model": "simple-cnn", "local-epochs": 1, "batch-size": 32}


def config_text(settings: dict[str, object]) -> str:
    return " ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())


def periods(ends: list[float]) -> list[float]:
    """Seconds between consecutive round ends, from round 2 on."""
    return [later - earlier for earlier, later in zip(ends[1:], ends[2:], strict=False)]


def run_fedcoord(cluster: LocalDeployment, rounds: int, name: str) -> dict[str, float]:
    runs_dir = cluster.root / "runs"
    settings = {
        **WORKLOAD,
        "num-server-rounds": rounds,
        "min-train-nodes": NODES,
        "runs-dir": str(runs_dir),
        "run-name": name,
    }
    result = cluster.flwr_run(config_text(settings))
    database = runs_dir / name / "run.db"
    if result.returncode != 0 or not database.exists():
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT ended_at, metrics_json, central_accuracy FROM rounds ORDER BY round"
        ).fetchall()
    ends = [float(row[0]) for row in rows]  # round 0 (initial evaluation) first
    metrics = [json.loads(row[1]) for row in rows[2:]]
    return {
        "round_s": statistics.median(periods(ends)),
        "training_s": statistics.median(m["train-seconds"] for m in metrics),
        "train_phase_s": statistics.median(m["seconds-train-phase"] for m in metrics),
        "federated_eval_s": statistics.median(m["seconds-federated-eval"] for m in metrics),
        "accuracy": float(rows[-1][2]),
    }


def run_flower_fedavg(
    cluster: LocalDeployment, app: Path, rounds: int, name: str
) -> dict[str, float]:
    runs_dir = cluster.root / "runs"
    settings = {
        **WORKLOAD,
        "num-server-rounds": rounds,
        "runs-dir": str(runs_dir),
        "run-name": name,
        "bench-num-nodes": NODES,
    }
    result = cluster.flwr_run(config_text(settings), app_dir=app)
    recorded = runs_dir / name / "flower_rounds.json"
    if result.returncode != 0 or not recorded.exists():
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    rows = json.loads(recorded.read_text())  # [server_round, time, accuracy], round 0 first
    return {
        "round_s": statistics.median(periods([row[1] for row in rows])),
        "training_s": float("nan"),
        "accuracy": float(rows[-1][2]),
    }


def serverapp_patch(folder: Path) -> dict[str, str]:
    """Environment that makes every ``flwr-serverapp`` pull reply objects with a 20 ms backoff."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SERVERAPP_PULL_PATCH)
    return {"PYTHONPATH": str(folder)}


def measure(
    node_args: list[str], rounds: int, label: str, args: argparse.Namespace, proxy: bool
) -> list[tuple[str, dict[str, float]]]:
    node_data = [["--partition-id", str(i), "--num-partitions", str(NODES)] for i in range(NODES)]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        env = serverapp_patch(Path(tmp) / "patch") if args.fast_server_pull else {}
        # Snapshots: the builds the nodes allow stay the same while the tree is edited.
        app = snapshot_app(PROJECT_DIR, Path(tmp) / "app" / "fedcoord")
        baseline = build_baseline_app(Path(tmp) / "baseline-app")
        cluster = LocalDeployment(
            Path(tmp),
            node_data,
            node_args=node_args,
            superlink_env=env,
            superlink_args=["--in-memory"] if args.in_memory else [],
            app_dir=app,
            allowed_apps=[app_hash(app), app_hash(baseline)],
            proxy=proxy,
        )
        with cluster:
            ours = run_fedcoord(cluster, rounds, f"ours-{label}")
            flower = run_flower_fedavg(cluster, baseline, rounds, f"flower-{label}")
    front = "behind nginx" if proxy else "Flower's port (--no-proxy)"
    return [
        (f"Flower FedAvg `Strategy.start`, {label} nodes, {front}", flower),
        (f"fedcoord coordinator, {label} nodes, {front}", ours),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--stock", action="store_true", help="also on Flower's default nodes")
    parser.add_argument(
        "--fast-server-pull",
        action="store_true",
        help="give Flower's ServerApp fedcoord's 20 ms object-pull backoff too",
    )
    parser.add_argument("--node-poll", type=float, help="SuperNode idle poll seconds")
    parser.add_argument("--dir", help="where the deployment's files (state.db, ...) go")
    parser.add_argument(
        "--in-memory", action="store_true", help="SuperLink without a database (Flower's default)"
    )
    fronts = parser.add_mutually_exclusive_group()
    fronts.add_argument(
        "--no-proxy", action="store_true", help="nodes reach Flower's port itself, no nginx"
    )
    fronts.add_argument(
        "--compare-proxy", action="store_true", help="warm nodes behind nginx, then without it"
    )
    args = parser.parse_args()
    warm = ["--cpu-threads", "1"]
    if args.node_poll is not None:
        warm += ["--poll-interval", str(args.node_poll)]
    results = measure(warm, args.rounds, "warm", args, proxy=not args.no_proxy)
    if args.compare_proxy:
        results += measure(warm, args.rounds, "warm", args, proxy=False)
    if args.stock:
        stock = ["--cpu-threads", "1", "--isolation", "subprocess", "--poll-interval", "3"]
        stock += ["--allow-any-app"]  # Flower's own processes check nothing
        results += measure(stock, args.rounds, "stock Flower", args, proxy=not args.no_proxy)
    print(
        f"deployment: SuperLink (TLS, node auth) + {NODES} SuperNodes on loopback, "
        f"{args.rounds} rounds, digits / simple-cnn / 1 local epoch; median of rounds 2..N"
        + ("; Flower's ServerApp with the 20 ms object pull too" if args.fast_server_pull else "")
        + ("; SuperLink without database" if args.in_memory else "")
        + "\n"
    )
    print("| server loop, nodes | s / round | client training s | final accuracy |")
    print("|---|---:|---:|---:|")
    for name, result in results:
        training = result["training_s"]
        training_text = "-" if math.isnan(training) else f"{training:.2f}"
        print(f"| {name} | {result['round_s']:.2f} | {training_text} | {result['accuracy']:.4f} |")
    for index in range(0, len(results), 2):
        flower, ours = results[index][1], results[index + 1][1]
        ratio = ours["round_s"] / flower["round_s"]
        print(
            f"\n{results[index + 1][0]}: ratio to Flower {ratio:.2f}; median train phase "
            f"{ours['train_phase_s']:.2f} s (client training {ours['training_s']:.2f} s), "
            f"federated evaluation {ours['federated_eval_s']:.2f} s"
        )


if __name__ == "__main__":
    main()
