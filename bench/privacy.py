"""Accuracy against epsilon: client-level DP with ``clipped`` and Poisson sampling.

For each dataset:

1. **Clip norm from measured update norms.** A run of ``clipped`` without noise
   and with a clip norm no update reaches records the L2 norm of every node's
   update (``client - global``) in its first round(s); the clip norm is their
   median, the quantile Andrew et al.'s adaptive clipping aims at
   (https://arxiv.org/abs/1905.03871), here fixed for the run.
2. **Runs at that clip norm**, Poisson sampling (each node joins a round with
   probability ``q``), noise multipliers 0 (clipping alone: epsilon infinite),
   0.5, 1.0 and 2.0. The table gives the final and best central accuracy and the
   epsilon the run reports (dp-accounting's RDP accountant, at delta 1e-5).

DP needs many nodes: the noise on the average is ``z * clip / (q * N)`` per
coordinate, whatever the model size. To keep this within about ten minutes on a
2-core machine the runs are small: digits in 100 nodes (about 14 examples each,
q = 0.2, 15 rounds), Fashion-MNIST in 1,000 nodes (60 each, q = 0.05, 4 rounds of
one local epoch), every example training (``local-test-fraction=0``, no federated
evaluation); central evaluation on the whole test set after every round. Each run is the ServerApp's
own ``run_training`` (coordinator, strategy, accountant, run store) with the
ClientApp's own ``train_fn``, joined by an in-process Grid: the code of
``flwr run`` without Flower's transport and Ray, whose start-up (about 30 s a
run) alone would not fit the time.

Usage: python bench/privacy.py [--datasets digits fashion-mnist] [--noise 0.5 1.0 2.0]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from client.app import evaluate_fn, query_fn, train_fn  # noqa: E402
from server.app import open_new_run, run_training  # noqa: E402
from server.record.store import RunStore  # noqa: E402
from strategies.accounted import accounted  # noqa: E402
from strategies.aggregation import compute_update_norm  # noqa: E402
from strategies.records import arrays_to_numpy  # noqa: E402
from strategies.registry import build_strategy  # noqa: E402
from task import keys  # noqa: E402
from task.config import parse_run_config  # noqa: E402

UNREACHED_CLIP = 1e6
DELTA = 1e-5


@dataclass(frozen=True)
class Setting:
    """One dataset's federation: nodes, sampling probability, rounds and client training."""

    nodes: int
    probability: float
    rounds: int
    measure_rounds: int  # rounds whose update norms choose the clip norm
    client: dict[str, object]


SETTINGS = {
    "digits": Setting(100, 0.2, 15, 2, {"local-epochs": 5, "batch-size": 16, "lr": 0.05}),
    "fashion-mnist": Setting(1000, 0.05, 4, 1, {"local-epochs": 1, "batch-size": 16, "lr": 0.05}),
}


class LocalGrid:
    """Nodes in this process: each message is answered at once by the ClientApp's function.

    What the coordinator uses of Flower's ``Grid``: ``get_node_ids``, ``push_messages``
    and ``pull_messages``.
    """

    HANDLERS = {"train": train_fn, "evaluate": evaluate_fn, "query": query_fn}

    def __init__(self, run_config: dict[str, object], nodes: int) -> None:
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={"partition-id": node_id - 100, "num-partitions": nodes},
                state=RecordDict(),
                run_config=run_config,  # type: ignore[arg-type]
            )
            for node_id in range(100, 100 + nodes)
        }
        self.update_norms: list[float] = []
        self._replies: dict[str, Message] = {}
        self._sent = 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        ids = []
        for message in messages:
            message_id = f"m{self._sent}"
            self._sent += 1
            message.metadata.__dict__["_message_id"] = message_id
            kind = message.metadata.message_type
            reply = self.HANDLERS[kind](message, self.contexts[message.metadata.dst_node_id])
            if kind == "train":
                sent = arrays_to_numpy(message.content[keys.ARRAYS])
                trained = arrays_to_numpy(reply.content[keys.ARRAYS])
                self.update_norms.append(
                    compute_update_norm([trained[name] - sent[name] for name in sent])
                )
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]


@dataclass
class Outcome:
    dataset: str
    noise: float
    clip: float
    final: float
    best: float
    epsilon: float
    rounds: int
    seconds: float


def run_once(
    dataset: str, setting: Setting, runs_dir: Path, name: str, **overrides: object
) -> tuple[LocalGrid, RunStore]:
    """One run of ``clipped`` with Poisson sampling, as the ServerApp runs it."""
    run_config = {
        "dataset": dataset,
        "strategy": "clipped",
        "sampling": "poisson",
        "fraction-train": setting.probability,
        "min-train-nodes": 1,
        "num-server-rounds": setting.rounds,
        "local-test-fraction": 0.0,
        "fraction-evaluate": 0.0,
        "target-delta": DELTA,
        "device": "cpu",
        "runs-dir": str(runs_dir),
        "run-name": name,
        **setting.client,
        **overrides,
    }
    config = parse_run_config(run_config)
    store = open_new_run(config, name)
    grid = LocalGrid(run_config, setting.nodes)
    run_training(grid, config, store, accounted(build_strategy(config), config))  # type: ignore[arg-type]
    return grid, store


def measure_clip_norm(dataset: str, setting: Setting, runs_dir: Path) -> float:
    """The median L2 norm of the updates of a short run that clips nothing."""
    grid, _ = run_once(
        dataset,
        setting,
        runs_dir,
        f"{dataset}-norms",
        **{"clip-norm": UNREACHED_CLIP, "num-server-rounds": setting.measure_rounds},
    )
    norms = grid.update_norms
    median = statistics.median(norms)
    print(
        f"{dataset}: {len(norms)} update norms over {setting.measure_rounds} round(s): "
        f"min {min(norms):.3f}, median {median:.3f}, max {max(norms):.3f}; clip norm {median:.3f}",
        flush=True,
    )
    return median


def run_setting(
    dataset: str, setting: Setting, noise: float, clip: float, runs_dir: Path
) -> Outcome:
    started = time.perf_counter()
    name = f"{dataset}-z{noise:g}"
    _, store = run_once(
        dataset, setting, runs_dir, name, **{"clip-norm": clip, "noise-multiplier": noise}
    )
    rows = RunStore(runs_dir / name, readonly=True).rounds()
    accuracies = [float(r["central_accuracy"]) for r in rows]  # type: ignore[arg-type]
    metrics = json.loads(str(rows[-1]["metrics_json"]))
    store.close()
    return Outcome(
        dataset,
        noise,
        clip,
        accuracies[-1],
        max(accuracies),
        float(metrics["epsilon"]),
        len(rows) - 1,
        time.perf_counter() - started,
    )


def print_table(outcomes: list[Outcome]) -> None:
    print(
        "\n| dataset | nodes | q | rounds | clip norm | noise multiplier | final accuracy "
        "| best | epsilon (delta 1e-5) | seconds |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for o in outcomes:
        setting = SETTINGS[o.dataset]
        epsilon = "inf" if math.isinf(o.epsilon) else f"{o.epsilon:.2f}"
        print(
            f"| {o.dataset} | {setting.nodes} | {setting.probability} | {o.rounds} | {o.clip:.3f} "
            f"| {o.noise:g} | {o.final:.4f} | {o.best:.4f} | {epsilon} | {o.seconds:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--noise", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    args = parser.parse_args()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as a ServerApp
    logging.getLogger("flwr").setLevel(logging.WARNING)  # the table, not every round's line
    # One process trains every node: one torch thread. On a shared 2-core machine two
    # threads measured 10x slower per example than one (threads fighting for cores).
    torch.set_num_threads(1)
    np.seterr(all="ignore")
    started = time.perf_counter()
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="fedcoord-privacy-") as folder:
        runs_dir = Path(folder)
        for dataset in args.datasets:
            setting = SETTINGS[dataset]
            clip = measure_clip_norm(dataset, setting, runs_dir)
            for noise in (0.0, *args.noise):
                outcome = run_setting(dataset, setting, noise, clip, runs_dir)
                print(
                    f"{dataset} z={noise:g}: accuracy {outcome.final:.4f}, epsilon "
                    f"{outcome.epsilon:.3g} ({outcome.seconds:.0f}s)",
                    flush=True,
                )
                outcomes.append(outcome)
    print_table(outcomes)
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
