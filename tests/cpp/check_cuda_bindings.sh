#!/usr/bin/env bash
# Syntax check of csrc/bindings_cuda.cpp (the torch side of the CUDA ops) on a machine whose torch has
# no CUDA: g++ -fsyntax-only against the installed torch's headers (the CPU wheels ship c10/cuda) and
# CUDA's cuda_runtime.h. Skips, saying why, when either is missing. Exits non-zero on a compile error.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY=${PYTHON:-python3}
torch_inc="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
py_inc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
cuda_inc=""
for d in "${CUDA_HOME:-}/include" /usr/local/cuda/include; do [ -f "$d/cuda_runtime.h" ] && { cuda_inc="$d"; break; }; done
if [ -z "$cuda_inc" ] || [ ! -f "$torch_inc/c10/cuda/CUDAStream.h" ]; then
  echo "CUDA bindings check: skipped (cuda_runtime.h or torch's c10/cuda headers not found)"
  exit 0
fi
stub="$(mktemp -d)"
trap 'rm -rf "$stub"' EXIT
# generated at torch's build time and absent from CPU wheels; empty is enough for a syntax check
if [ ! -f "$torch_inc/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$stub/c10/cuda/impl" && echo '#pragma once' >"$stub/c10/cuda/impl/cuda_cmake_macros.h"
fi
if ! ${CXX:-g++} -std=c++17 -fsyntax-only -DCTP_WITH_CUDA -I"$root/csrc" -I"$stub" -I"$torch_inc" \
    -I"$torch_inc/torch/csrc/api/include" -I"$cuda_inc" -I"$py_inc" "$root/csrc/bindings_cuda.cpp" >"$stub/log" 2>&1; then
  grep -E "error" -A3 "$stub/log" | head -60
  echo "CUDA bindings check: csrc/bindings_cuda.cpp FAILED to compile"
  exit 1
fi
echo "CUDA bindings check: csrc/bindings_cuda.cpp compiles (syntax)"
