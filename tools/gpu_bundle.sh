#!/usr/bin/env bash
# Pack what `make gpu-check` needs on an air-gapped GPU host into one folder of at most
# 60 MiB: the project (this commit, as git archive), Fashion-MNIST from Debian's
# dataset-fashion-mnist where it is installed, and RUN.txt with the commands to run there.
#
# Usage: tools/gpu_bundle.sh DIR
#
# The host needs Python >= 3.11 with torch, torchvision, numpy, scikit-learn and pytest
# (the gpu tests and bench/gpu.py import nothing else): no wheel is carried for them.
# The deployment step of the check needs flwr with its dependencies (flwr-datasets,
# datasets and pyarrow among them: about 200 MB of wheels, over the limit), so it is
# skipped there unless the host's operator installs `fedcoord` into that Python.
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: tools/gpu_bundle.sh DIR" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
dir="$1"
limit_mib=60
if [ -e "$dir" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then
    echo "gpu-bundle: $dir exists and is not empty; give a new folder" >&2
    exit 2
fi
mkdir -p "$dir/data"
git archive --format=tar.gz --prefix=fedcoord/ -o "$dir/fedcoord.tar.gz" HEAD
fashion=/usr/share/datasets/fashion-mnist
data_note="no Fashion-MNIST here (apt-get install dataset-fashion-mnist): the FedAvg loop uses MNIST if the host has torchvision's MNIST/raw, else it is skipped"
if ls "$fashion"/*-ubyte.gz >/dev/null 2>&1; then
    mkdir -p "$dir/data/fashion-mnist"
    cp "$fashion"/*-ubyte.gz "$dir/data/fashion-mnist/"
    data_note="Fashion-MNIST from Debian's package, in data/fashion-mnist"
fi
cat >"$dir/RUN.txt" <<TXT
fedcoord GPU check, bundled from commit $(git rev-parse --short HEAD)
Data: $data_note

On the GPU host (Python with torch, torchvision, numpy, scikit-learn, pytest):

    tar xzf fedcoord.tar.gz
    cd fedcoord
    GPU_CHECK_DATA=\$PWD/../data tools/gpu_check.sh python3

It runs the gpu tests, bench/gpu.py (one client update in each training variant, then
the FedAvg paper loop) and prints one table; the logs are in fedcoord/gpu-check/.
The 2-node deployment step runs only where flwr is installed (pip install -e . from a
machine with the package registries, or the host operator's own wheel mirror).
TXT
size_kib=$(du -sk "$dir" | cut -f1)
if [ "$size_kib" -gt $((limit_mib * 1024)) ]; then
    echo "gpu-bundle: $dir is $((size_kib / 1024)) MiB, over the $limit_mib MiB limit" >&2
    exit 1
fi
echo "gpu-bundle: wrote $dir ($((size_kib / 1024)) MiB): fedcoord.tar.gz, data/, RUN.txt"
