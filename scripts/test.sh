#!/usr/bin/env bash
# The test command (README; .ci/run runs exactly this). Fails non-zero on any error.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
echo "== C++ kernel test under AddressSanitizer + UndefinedBehaviorSanitizer (and nvcc compile check)"
bash tests/cpp/run_sanitized.sh
echo "== CUDA bindings syntax check (g++ against torch's headers; the kernels themselves: nvcc above)"
bash tests/cpp/check_cuda_bindings.sh
echo "== Python tests"
"$PY" -m pytest -q tests
