#!/usr/bin/env bash
# The main job (README's first command): set up, then run the kernel benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 benchmarks/bench_int4.py "$@"
