#!/usr/bin/env bash
# The GPU check: on a machine with CUDA, run the `gpu` tests, bench/gpu.py and (where
# flwr is installed) a 2-node SuperLink + SuperNodes run with device='cuda', then print
# one table of what passed. Without CUDA: one line, exit 2.
#
# Usage: tools/gpu_check.sh [PYTHON]      (default: .venv/bin/python, else python3)
#        GPU_CHECK_DATA=DIR: the data folder (DIR/fashion-mnist/*.gz, torchvision's MNIST/raw)
# Runs from any folder; needs torch, torchvision, numpy, scikit-learn, pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${1:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu-check: no CUDA device visible to $python (torch.cuda.is_available() is False); run it on a GPU host" >&2
    exit 2
fi
out="${GPU_CHECK_OUT:-gpu-check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
declare -a rows
failed=0

step() {  # step NAME LOG COMMAND...: run, record passed/failed with the log's last line
    local name="$1" log="$2"; shift 2
    local started=$SECONDS
    if "$@" >"$log" 2>&1; then
        rows+=("| $name | passed | $((SECONDS - started)) s | $(tail -n 1 "$log" | cut -c1-90) |")
    else
        failed=1
        rows+=("| $name | FAILED (see $log) | $((SECONDS - started)) s | $(tail -n 1 "$log" | cut -c1-90) |")
    fi
}

# 1. The gpu tests; conftest.py needs flwr, these tests do not.
step "gpu tests" "$out/tests.log" "$python" -m pytest -q -m gpu --noconftest -p no:cacheprovider tests/test_gpu.py
# 2. One client update in each variant, and the FedAvg-paper loop on the data at hand.
step "bench/gpu.py" "$out/bench.log" "$python" bench/gpu.py ${GPU_CHECK_DATA:+--data-dir "$GPU_CHECK_DATA"}
# 3. A 2-node deployment on this GPU, where flwr is installed.
if "$python" -c 'import flwr' 2>/dev/null; then
    step "2 SuperNodes, device='cuda'" "$out/deployment.log" "$python" bench/gpu_deployment.py
else
    rows+=("| 2 SuperNodes, device='cuda' | skipped | 0 s | flwr is not installed here (tools/gpu_bundle.sh carries its wheels) |")
fi

cat "$out/bench.log" 2>/dev/null | grep -v "^  round" || true
echo
echo "| step | result | time | last line |"
echo "|---|---|---:|---|"
printf '%s\n' "${rows[@]}"
exit $failed
