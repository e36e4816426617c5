#!/usr/bin/env bash
# The main job (README's first command): set up, then the demo (pass --quick for a short run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ctp_fast demo "$@"
