#!/usr/bin/env bash
# Run the GPU test subset and the benchmarks; results land in benchmarks/results/.
# On a machine without a GPU this prints so and exits 0. Extra arguments go to gpu_suite.py:
# --quick (a short run), --skip-tests, --peak-gbps N, --out DIR, and --smoke-cpu (every section on
# the CPU at tiny shapes, to check the code path; writes gpu_suite_cpu_smoke.json).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_suite.py "$@"
