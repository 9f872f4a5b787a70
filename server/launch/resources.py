"""What simulated nodes run on: GPUs for Ray to hand out, and the Ray cluster.

Ray gives a simulated node only the GPUs it asks for: a node that asks for none
sees ``CUDA_VISIBLE_DEVICES=''``, so ``device='cuda'`` would find no GPU and
``auto`` would train on the CPU. ``--num-gpus`` is each node's share of a GPU
(``client-resources-num-gpus`` in Flower's federation config); ``auto`` shares the
visible GPUs among the nodes that train at once. Everything is checked before the
SuperLink starts, so a run that cannot get its GPUs ends at once with one line.
"""

from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass

from task.config import ConfigError

_HOST_PORT = re.compile(r"^(?:ray://)?[A-Za-z0-9.\-\[\]:]+:(\d{1,5})$")


@dataclass(frozen=True)
class SimulationResources:
    """What the simulated nodes run on: a GPU share each, and the Ray cluster (if not ours)."""

    num_gpus: float = 0.0
    ray_address: str = ""


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    import torch  # noqa: PLC0415 - only the launcher's GPU check needs it

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_ray_address(text: str) -> str:
    """A Ray cluster address, ``HOST:PORT`` (or ``ray://HOST:PORT``), or ``""`` for none.

    Raises
    ------
    ConfigError
        For anything else, naming the form.
    """
    text = text.strip()
    if not text:
        return ""
    match = _HOST_PORT.match(text)
    if match is None or not 1 <= int(match.group(1)) <= 65535:
        raise ConfigError(
            f"--ray-address {text!r} is not HOST:PORT (e.g. 10.0.0.5:6379, the address "
            "`ray start --head` prints)"
        )
    return text


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a Ray cluster address nothing answers on (Ray would wait for it without end).

    Raises
    ------
    ConfigError
        Naming the address and what to check.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except OSError as error:
        raise ConfigError(
            f"--ray-address {address}: nothing answers there ({error.strerror or error}); "
            "start the cluster with `ray start --head --port=PORT` or check the address"
        ) from None


def parse_num_gpus(text: str) -> float | None:
    """``--num-gpus``: None for ``auto``, else a share in [0, 1] or a whole number of GPUs.

    Raises
    ------
    ConfigError
        For a value Ray cannot place, naming the valid ones.
    """
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value > 1 and not value.is_integer()):
        raise ConfigError(
            f"--num-gpus {text!r}: give auto, a share of one GPU in [0, 1] (e.g. 0.25: four "
            "nodes per GPU) or a whole number of GPUs per node"
        )
    return value


def check_nodes(supernodes: int, num_cpus: float) -> int:
    """``--num-cpus`` as Flower's simulation config holds it (an integer), after checking both.

    Raises
    ------
    ConfigError
        For fewer than 1 simulated node, or CPUs per node that are not a whole number
        >= 1 (``flwr run`` would fail on them after the SuperLink started).
    """
    if supernodes < 1:
        raise ConfigError(f"--supernodes must be at least 1, got {supernodes}")
    if not (math.isfinite(num_cpus) and num_cpus >= 1 and num_cpus == int(num_cpus)):
        raise ConfigError(
            f"--num-cpus must be a whole number of CPUs per node, at least 1, got {num_cpus:g} "
            "(Flower's simulation config holds an integer)"
        )
    return int(num_cpus)


def auto_gpu_share(gpus: int, supernodes: int, num_cpus: float) -> float:
    """The visible GPUs shared among the nodes that train at once (by CPUs), at most 1 each."""
    if gpus == 0:
        return 0.0
    at_once = max(1, min(supernodes, int((os.cpu_count() or 1) // max(num_cpus, 1e-9))))
    return min(1.0, math.floor(100 * gpus / at_once) / 100) or 0.01


def plan_resources(
    num_gpus_text: str, ray_address_text: str, device: str, supernodes: int, num_cpus: float
) -> SimulationResources:
    """The GPU share and Ray cluster of a simulation, or a one-line refusal.

    Raises
    ------
    ConfigError
        When nodes would wait forever for GPUs Ray cannot give (``--num-gpus`` > 0
        with none visible) or ``device='cuda'`` could find none (no GPU here, or
        nodes asking for none), naming the fix.
    """
    ray_address = parse_ray_address(ray_address_text)
    asked = parse_num_gpus(num_gpus_text)
    wants_cuda = device.strip().lower().startswith("cuda")
    if ray_address:  # the cluster's GPUs are not visible from here: take the user's word
        check_reachable(ray_address)
        if wants_cuda and not asked:
            raise ConfigError(
                f"device={device!r} on a Ray cluster: give each node GPUs with --num-gpus "
                "(e.g. 0.25); Ray hides GPUs from nodes that ask for none"
            )
        return SimulationResources(asked or 0.0, ray_address)
    gpus = visible_gpus()
    if asked and gpus == 0:
        raise ConfigError(
            f"--num-gpus {num_gpus_text}: no GPU is visible here (torch.cuda.device_count() is "
            "0), and Ray would wait forever to place the nodes; drop --num-gpus or use a GPU "
            "machine"
        )
    if wants_cuda and gpus == 0:
        raise ConfigError(
            f"device={device!r}: no CUDA GPU is visible here; use device='auto' or 'cpu', "
            "or run on a GPU machine"
        )
    if asked is not None and asked > gpus:
        raise ConfigError(
            f"--num-gpus {num_gpus_text}: each node would need {asked:g} GPUs and {gpus} "
            "are visible here; Ray could place no node. Give a share of one GPU, e.g. 0.5"
        )
    share = auto_gpu_share(gpus, supernodes, num_cpus) if asked is None else asked
    if wants_cuda and share == 0:
        raise ConfigError(
            f"device={device!r} with --num-gpus 0: Ray hides every GPU from the simulated "
            "nodes; give each a share, e.g. --num-gpus 0.25 (make demo NUM_GPUS=0.25)"
        )
    return SimulationResources(share, "")
