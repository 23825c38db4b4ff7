#!/usr/bin/env bash
# Run the GPU test subset and the benchmarks; results land in benchmarks/results/.
# On a machine without a GPU this prints so and exits 0. Extra arguments go to gpu_suite.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_suite.py "$@"
