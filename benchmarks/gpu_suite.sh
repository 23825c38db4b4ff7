#!/usr/bin/env bash
# The first thing to run on a GPU machine: correctness probes of every GPU path, the `gpu` tests,
# then layer, kernel and end-to-end timings, within a time budget (default 420 s, about 8 minutes
# with start-up on an H100/H200). Results land in benchmarks/results/ and are rewritten after each
# section, so a run that is cut short keeps what it measured.
#
# Works from a plain copy of the repository: sparsetrain need not be installed (the suite puts the
# repository root on the import path) and only `python3` need exist. Set PYTHON=/path/to/python to
# choose the interpreter. Extra arguments go to gpu_suite.py (see `--help`): --budget-s N, --quick,
# --skip-tests, --peak-gbps N, --out DIR, --smoke-cpu (every section on the CPU at tiny shapes).
# Without a GPU (and without --smoke-cpu) it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    local cand
    for cand in ${PYTHON:-} python3 python; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
            echo "$cand"
            return 0
        fi
    done
    return 1
}

if ! py="$(find_python)"; then
    echo "gpu_suite.sh: no Python interpreter that can import torch (tried: ${PYTHON:+\$PYTHON=$PYTHON, }python3, python)." >&2
    echo "Set PYTHON=/path/to/python to the interpreter of the environment that has PyTorch." >&2
    exit 2
fi
exec "$py" benchmarks/gpu_suite.py "$@"
