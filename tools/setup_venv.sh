#!/usr/bin/env bash
# Create .venv (if needed) and install fedcoord with its dev extra, quietly.
#
# Usage: tools/setup_venv.sh PYTHON VENV
# pip's output goes to VENV/setup.log; on success one closing line is printed, on
# failure the log's last lines (pip's errors) and the command that failed.
set -uo pipefail
python="$1"
venv="$2"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11) and "fedcoord needs Python >= 3.11 (Flower 1.42): make setup PYTHON=python3.11")' || exit 1
started=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv" || { echo "setup: $python -m venv $venv failed" >&2; exit 1; }
fi
log="$venv/setup.log"
: >"$log"
run() {
    if ! "$@" >>"$log" 2>&1; then
        grep -v "^WARNING: Location 'file:" "$log" | tail -n 25 >&2
        echo "setup: '$*' failed; full output in $log" >&2
        exit 1
    fi
}
run "$venv/bin/pip" install --upgrade pip
run "$venv/bin/pip" install -e ".[dev]"
versions="$("$venv/bin/python" -c 'import flwr, torch; print(f"flwr {flwr.__version__}, torch {torch.__version__}")')"
echo "setup: installed fedcoord[dev] ($versions) into $venv in $((SECONDS - started)) s"
