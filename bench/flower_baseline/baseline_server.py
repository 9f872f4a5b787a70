"""Bench-only ServerApp: Flower's own FedAvg ``Strategy.start`` with fedcoord's ClientApp.

Same data, model, client training and central evaluation as the fedcoord
ServerApp, so the two can be timed side by side. It writes the wall-clock time
at which each round's central evaluation ran to
``<runs-dir>/<run-name>/flower_rounds.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from server.app import make_central_evaluate
from task.config import parse_run_config
from task.datasets import load_dataset
from task.models import build_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = parse_run_config(context.run_config)
    data = load_dataset(config.dataset, config.resolved_data_dir, config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes, config.seed)
    evaluate = make_central_evaluate(config, data)
    times: list[tuple[int, float, float]] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        loss, accuracy = evaluate({k: v.numpy() for k, v in arrays.items()})
        times.append((server_round, time.time(), accuracy))
        return MetricRecord({"central-loss": loss, "central-accuracy": accuracy})

    num_nodes = int(context.run_config.get("bench-num-nodes", 2))
    strategy = FedAvg(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_available_nodes=num_nodes,
    )
    strategy.start(
        grid,
        ArrayRecord(model.state_dict()),
        num_rounds=config.num_server_rounds,
        train_config=ConfigRecord({}),
        evaluate_fn=evaluate_fn,
    )
    out = config.resolved_runs_dir / (config.run_name or "flower-baseline")
    out.mkdir(parents=True, exist_ok=True)
    Path(out / "flower_rounds.json").write_text(json.dumps(times))
