"""Two SuperNodes training on this machine's GPU: a real deployment with ``device='cuda'``.

Starts a SuperLink (TLS, node authentication, no nginx) and 2 SuperNodes with
``python -m deploy supernode --gpu 0`` through ``deploy.local_cluster``, runs 3
rounds of fedcoord on digits with ``device='cuda'``, and prints each node's device
as the run recorded it. Exits 1 if the run did not complete or a node trained
elsewhere than on CUDA. Part of ``tools/gpu_check.sh``; needs flwr.

Usage: python bench/gpu_deployment.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from deploy.local_cluster import PROJECT_DIR, LocalDeployment, snapshot_app
from server.record.store import RunStore


def main(argv: list[str] | None = None) -> int:
    """Run the deployment; print the nodes' devices; 0 when every node trained on CUDA."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedcoord-gpu-") as tmp:
        root = Path(tmp)
        app = snapshot_app(PROJECT_DIR, root / "app")
        nodes = [["--partition-id", str(i), "--num-partitions", "2"] for i in range(2)]
        settings = (
            f"device='cuda' dataset='digits' num-server-rounds={args.rounds} "
            f"min-train-nodes=2 runs-dir='{root / 'runs'}' run-name='gpu'"
        )
        with LocalDeployment(
            root, nodes, app_dir=app, proxy=False, node_args=("--gpu", "0")
        ) as cluster:
            cluster.wait_for_nodes(2)
            result = cluster.flwr_run(settings, timeout_s=600)
        store = RunStore(root / "runs" / "gpu", readonly=True)
        try:
            state = store.run_row()["state"]
            devices = sorted(str(node["device"]) for node in store.nodes())
        finally:
            store.close()
    print(f"run {state}; node devices: {', '.join(devices) or 'none recorded'}")
    if result.returncode != 0 or state != "completed":
        print((result.stdout + result.stderr)[-3000:], file=sys.stderr)
        return 1
    on_cuda = len(devices) == 2 and all(device.startswith("cuda") for device in devices)
    print("2 SuperNodes trained on the GPU" if on_cuda else "a node did not train on CUDA")
    return 0 if on_cuda else 1


if __name__ == "__main__":
    sys.exit(main())
