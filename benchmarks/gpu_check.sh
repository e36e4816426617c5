#!/usr/bin/env bash
# On a fresh GPU machine (an H200: torch with CUDA, nvcc, 16 cores): build ctp_fast with its CUDA
# kernels in place, run the CUDA tests, then the GPU benchmarks; about 8 minutes at most, each stage
# bounded by `timeout`. Logs and the benchmark table go to $OUT (default benchmarks/results/gpu).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/benchmarks/results/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export CTP_CUDA_ARCHS="${CTP_CUDA_ARCHS:-90a}" MAX_JOBS="${MAX_JOBS:-16}"
py="${PYTHON:-python3}"
status=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== build (sm_$CTP_CUDA_ARCHS)"
start=$(date +%s)
if ! timeout 210 $py setup.py build_ext --inplace >"$out/build.log" 2>&1; then
  echo "build FAILED (see build.log):"; grep -E "error|Error" "$out/build.log" | head -40; tail -20 "$out/build.log"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
$py -c "import ctp_fast; assert ctp_fast._C.has_cuda(), 'built without CUDA'; print('ctp_fast._C has CUDA')" || exit 1

echo "== tests"
timeout 150 $py -m pytest -q -p no:cacheprovider --maxfail=40 tests/test_cuda.py tests/test_cuda_layout.py \
  >"$out/test_cuda.log" 2>&1 || status=1
grep -E "passed|failed|error" "$out/test_cuda.log" | tail -3
[ $status -eq 0 ] || { grep -E "^(FAILED|ERROR)" "$out/test_cuda.log" | head -40; }

if [ "${CTP_SANITIZE:-0}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  # opt-in: out-of-bounds and race checks on the small cases (needs a runtime with GPU counters)
  echo "== compute-sanitizer (memcheck) on small cases"
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider \
    tests/test_cuda.py -k "33-100 or prefix_attention_forward_and_backward" >"$out/sanitizer.log" 2>&1 || status=1
  tail -5 "$out/sanitizer.log"
fi

echo "== benchmarks"
timeout 100 $py benchmarks/bench_cuda.py --out "$out" 2>&1 | tee "$out/bench.log" | tail -25 || status=1
exit $status
