"""ServerApp entry: parse the config, open the run directory, run the coordinator."""

from __future__ import annotations

import os
import time
from logging import ERROR, INFO

import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.coordinator import Coordinator
from server.store import RunStore
from strategies.registry import build_strategy
from task.config import RunConfig, config_to_dict, parse_run_config
from task.datasets import DatasetSplits, load_dataset
from task.models import build_model
from task.training import load_numpy_into, model_to_numpy, resolve_device, test

app = ServerApp()


def make_run_name() -> str:
    """A fresh, sortable run name: ``run-YYYYmmdd-HHMMSS-<pid>``."""
    return time.strftime("run-%Y%m%d-%H%M%S") + f"-{os.getpid()}"


def make_central_evaluate(config: RunConfig, data: DatasetSplits):  # noqa: ANN201
    """Return ``evaluate_fn(arrays) -> (loss, accuracy)`` on the held-out test set."""
    device = resolve_device(config.device)
    model = build_model(config.model, data.input_shape, data.num_classes, config.seed).to(device)

    def evaluate(arrays: dict) -> tuple[float, float]:
        load_numpy_into(model, arrays)
        result = test(model, data.test, batch_size=max(256, config.batch_size), device=device)
        return result.loss, result.accuracy

    return evaluate


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one federated training run under the coordinator."""
    config = parse_run_config(context.run_config)
    strategy = build_strategy(config)
    run_name = config.run_name or make_run_name()
    run_dir = config.resolved_runs_dir / run_name
    store = RunStore.create(run_dir, run_name, config_to_dict(config), config.num_server_rounds)
    store.update_run(
        server_pid=os.getpid(), flwr_run_id=str(grid.run.run_id), heartbeat_at=time.time()
    )
    store.add_event("started", f"run {run_name} started, flwr run id {grid.run.run_id}")
    log(INFO, "fedcoord run %s: %s", run_name, run_dir)
    heartbeat = store.start_heartbeat()
    try:
        data = load_dataset(config.dataset, config.resolved_data_dir, config.seed)
        model = build_model(config.model, data.input_shape, data.num_classes, config.seed)
        initial = model_to_numpy(model)
        coordinator = Coordinator(
            grid, strategy, store, config, make_central_evaluate(config, data)
        )
        final = coordinator.run(initial)
    except BaseException as error:
        store.update_run(state="failed", message=f"{type(error).__name__}: {error}")
        store.add_event("failed", f"{type(error).__name__}: {error}")
        log(ERROR, "run %s failed: %s", run_name, error)
        raise
    finally:
        heartbeat.set()
        torch.cuda.empty_cache()
    store.update_run(state="completed", heartbeat_at=time.time(), phase="done")
    rounds = store.rounds()
    accuracy = rounds[-1]["central_accuracy"] if rounds else float("nan")
    store.add_event("completed", f"final accuracy {accuracy:.4f}")
    store.close()
    del final
    log(INFO, "final accuracy: %.4f", accuracy)
