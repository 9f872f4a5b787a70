"""Training on a GPU: the captured step trains as the eager one does; precision choices.

The tests marked ``gpu`` need CUDA and are skipped, with the reason, elsewhere
(``make gpu-check`` runs them on a GPU host). The rest check, on any machine, that
the CUDA options cost nothing and change nothing where there is no GPU.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from task import training
from task.datasets import TensorSplit
from task.models import build_model

NO_CUDA = "needs a CUDA GPU (run make gpu-check on a GPU host)"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


def random_split(examples: int, shape: tuple[int, int, int] = (1, 28, 28)) -> TensorSplit:
    generator = torch.Generator().manual_seed(7)
    x = torch.rand((examples, *shape), generator=generator)
    y = torch.randint(0, 10, (examples,), generator=generator)
    return TensorSplit(x, y)


def train_once(device: torch.device, split: TensorSplit, **options: object):
    model = build_model("simple-cnn", (1, 28, 28), 10, seed=3)
    settings = {"epochs": 2, "batch_size": 10, "lr": 0.05, "momentum": 0.9, "seed": 5}
    result = training.train(model, split, device=device, **{**settings, **options})
    return result, training.model_to_numpy(model)


def test_cuda_options_change_nothing_on_the_cpu():
    # Prepare: 47 examples, so the last batch (7) is short
    split = random_split(47)
    cpu = torch.device("cpu")

    # Execute
    eager, eager_weights = train_once(cpu, split, cuda_graphs="off", precision="fp32")
    graphs_on, on_weights = train_once(cpu, split, cuda_graphs="on", precision="auto")

    # Assert: bit for bit the same (auto precision is fp32; no graph on the CPU)
    assert eager.loss == graphs_on.loss and eager.accuracy == graphs_on.accuracy
    assert eager_weights.keys() == on_weights.keys()
    assert all((eager_weights[k] == on_weights[k]).all() for k in eager_weights)


@pytest.mark.parametrize(("key", "value"), [("cuda_graphs", "yes"), ("precision", "fp16")])
def test_unknown_precision_or_graph_choice_is_refused(key, value):
    with pytest.raises(ValueError, match="valid"):
        train_once(torch.device("cpu"), random_split(20), **{key: value})


@gpu
@needs_cuda
@pytest.mark.parametrize("proximal_mu", [0.0, 0.1])
def test_the_captured_step_trains_as_the_eager_step(proximal_mu):
    # Prepare: 4 full batches a few times over, and a short last one
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    split = random_split(207)
    device = torch.device("cuda", 0)

    # Execute
    eager, eager_weights = train_once(
        device, split, cuda_graphs="off", precision="fp32", proximal_mu=proximal_mu
    )
    graphed, graphed_weights = train_once(
        device, split, cuda_graphs="on", precision="fp32", proximal_mu=proximal_mu
    )

    # Assert: the same loss trajectory and weights, to float tolerance
    assert graphed.loss == pytest.approx(eager.loss, rel=1e-4)
    assert graphed.accuracy == pytest.approx(eager.accuracy, abs=1 / 207)
    assert graphed.num_examples == eager.num_examples == 207
    for name, weights in eager_weights.items():
        assert graphed_weights[name] == pytest.approx(weights, rel=1e-3, abs=1e-5), name


@gpu
@needs_cuda
def test_bf16_and_a_model_with_batchnorm_train_under_graphs():
    # Prepare
    split = random_split(64, (3, 32, 32))
    model = build_model("resnet18", (3, 32, 32), 10, seed=1)
    before = training.model_to_numpy(model)

    # Execute
    result = training.train(
        model,
        split,
        epochs=1,
        batch_size=16,
        lr=0.01,
        momentum=0.0,
        device=torch.device("cuda", 0),
        seed=1,
        precision="bf16",
        cuda_graphs="on",
    )

    # Assert: trained (finite loss, weights moved, BatchNorm counted every step)
    after = training.model_to_numpy(model)
    assert torch.isfinite(torch.tensor(result.loss)) and result.num_examples == 64
    assert any((after[k] != before[k]).any() for k in before if k.endswith("weight"))
    counters = [k for k in after if k.endswith("num_batches_tracked")]
    assert counters and all(int(after[k]) == 4 for k in counters)


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_is_one_line_and_exit_2():
    # Execute
    result = subprocess.run(
        ["tools/gpu_check.sh", sys.executable],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Assert
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert "no CUDA device" in result.stderr


def test_gpu_bundle_packs_the_project_data_and_commands_under_60_mib(tmp_path):
    # Execute
    result = subprocess.run(
        ["tools/gpu_bundle.sh", str(tmp_path / "bundle")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    # Assert: the archive holds the check and what it imports; the folder fits
    assert result.returncode == 0, result.stderr
    bundle = tmp_path / "bundle"
    size = sum(path.stat().st_size for path in bundle.rglob("*") if path.is_file())
    assert size <= 60 * 1024 * 1024
    with tarfile.open(bundle / "fedcoord.tar.gz") as archive:
        names = set(archive.getnames())
    for needed in ("tools/gpu_check.sh", "bench/gpu.py", "tests/test_gpu.py", "task/training.py"):
        assert f"fedcoord/{needed}" in names
    assert "tools/gpu_check.sh" in (bundle / "RUN.txt").read_text()
    refused = subprocess.run(
        ["tools/gpu_bundle.sh", str(bundle)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert refused.returncode == 2 and "not empty" in refused.stderr


@pytest.mark.parametrize(("key", "value"), [("precision", "fp16"), ("cuda-graphs", "yes")])
def test_a_precision_or_graph_choice_not_offered_is_refused_at_start(key, value):
    from task.config import ConfigError, parse_run_config

    with pytest.raises(ConfigError, match=f"{key}.*{value}"):
        parse_run_config({key: value})


def test_each_node_says_where_and_how_it_trains():
    from task.config import parse_run_config

    bf16 = parse_run_config({"precision": "bf16", "cuda-graphs": "off"})
    default = parse_run_config({})
    assert training.describe_device(torch.device("cpu"), default) == "cpu"
    assert training.describe_device(torch.device("cpu"), bf16) == "cpu bf16"
    assert training.describe_device(torch.device("cuda", 0), default) == "cuda:0 fp32 graphs"
    assert training.describe_device(torch.device("cuda", 1), bf16) == "cuda:1 bf16"
