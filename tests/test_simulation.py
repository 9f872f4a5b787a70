"""End to end: real `flwr run` simulations on a SuperLink the test session starts."""

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FINAL_LINE = re.compile(r"final accuracy: (0\.\d{4})")
ROUND_LINE = re.compile(r"round (\d+)/(\d+): train loss [\d.]+, central accuracy (0\.\d{4})")


def central_accuracies(run_dir: Path) -> list[float]:
    with sqlite3.connect(run_dir / "run.db") as db:
        rows = db.execute("SELECT round, central_accuracy FROM rounds ORDER BY round").fetchall()
    assert [r[0] for r in rows] == list(range(len(rows)))
    return [r[1] for r in rows]


def test_digits_ten_nodes_three_rounds_learns(simulate):
    # Execute
    run = simulate(10, "digits-e2e", **{"num-server-rounds": 3})

    # Assert: the run finished, logged each round and the final accuracy
    assert run.returncode == 0, run.output[-3000:]
    rounds_logged = [int(m.group(1)) for m in ROUND_LINE.finditer(run.output)]
    assert rounds_logged == [1, 2, 3], run.output[-3000:]
    final = FINAL_LINE.search(run.output)
    assert final is not None, run.output[-3000:]

    # Assert: central accuracy rises from the initial model and ends above 0.85
    accuracies = central_accuracies(run.run_dir)
    assert len(accuracies) == 4
    assert accuracies[-1] > 0.85
    assert accuracies[-1] > accuracies[0] + 0.5
    assert float(final.group(1)) == pytest.approx(accuracies[-1], abs=1e-4)

    # Assert: every node is recorded with its partition and examples
    with sqlite3.connect(run.run_dir / "run.db") as db:
        nodes = db.execute("SELECT partition_id, num_examples, rounds_joined FROM nodes").fetchall()
    assert sorted(n[0] for n in nodes) == list(range(10))
    assert all(n[1] > 0 and n[2] == 3 for n in nodes)

    # Assert: `fedcoord status --json` reports the finished run
    status = run.status()
    assert status["state"] == "completed"
    assert status["current_round"] == 3 and status["num_rounds"] == 3
    assert status["progress"] == 1.0
    assert status["nodes"] == 10
    assert status["metrics"]["central_accuracy"] == pytest.approx(accuracies[-1])
    assert isinstance(status["server_pid"], int) and status["heartbeat_age_s"] >= 0
    assert status["run_dir"] == str(run.run_dir)

    # Assert: `fedcoord runs` lists it
    listing = subprocess.run(
        [sys.executable, "-m", "server.ui.cli", "--runs-dir", str(run.run_dir.parent), "runs"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "digits-e2e" in listing and "completed" in listing and "3/3" in listing


def test_unknown_dataset_is_refused_before_any_round(simulate):
    # Execute
    run = simulate(2, "bad-dataset", dataset="imagenet")

    # Assert: the ServerApp failed at start, naming the valid datasets
    assert "unknown dataset 'imagenet'; valid: digits, mnist, fashion-mnist, cifar10" in run.output
    assert "round 1/" not in run.output
    assert not run.run_dir.exists()
    assert "Traceback" not in run.output, run.output[-3000:]


def test_too_few_nodes_fail_the_run_with_one_line(simulate):
    # Execute: 3 nodes wanted, 2 simulated
    run = simulate(2, "too-few", **{"min-train-nodes": 3, "node-wait-timeout": 3.0})

    # Assert: one ERROR line naming the fix, no traceback; the run is recorded failed
    assert "only 2 node(s) registered after 3s; min-train-nodes is 3: start more" in run.output
    assert "Traceback" not in run.output, run.output[-3000:]
    assert run.status()["state"] == "failed"


@pytest.mark.system_package("dataset-fashion-mnist")
def test_fashion_mnist_ten_nodes_three_rounds(simulate, tmp_path):
    # Execute
    # Execute: only the dataset changes; the training keys take its defaults
    run = simulate(
        10,
        "fashion-e2e",
        dataset="fashion-mnist",
        **{"data-dir": str(tmp_path / "data"), "num-server-rounds": 3},
    )

    # Assert: the first log line says which defaults it took, and the run learns
    assert run.returncode == 0, run.output[-3000:]
    assert "(fashion-mnist defaults: local-epochs, batch-size, lr, momentum)" in run.output
    accuracies = central_accuracies(run.run_dir)
    assert accuracies[-1] >= 0.80, accuracies
    training = run.status()["training"]
    assert training["lr"] == 0.01 and training["local-epochs"] == 1
    assert training["dataset-defaults"] == ["local-epochs", "batch-size", "lr", "momentum"]
    assert "(fashion-mnist defaults: local-epochs" in run.cli("status", "fashion-e2e").stdout
