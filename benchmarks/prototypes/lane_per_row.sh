#!/usr/bin/env bash
# The lane-per-row prototype (unstructured_lane_per_row.cpp) against the library's dense int4 and
# unstructured int4 forward at M = 1, one thread, the same 4096 x 4096 weight warm in cache, group 64.
set -euo pipefail
cd "$(dirname "$0")"
g++ -O3 -march=native -o /tmp/ctp_lane_per_row unstructured_lane_per_row.cpp
python3 - <<'PY'
import time, torch
torch.set_num_threads(1)
from ctp_fast import DenseWeight, UnstructuredWeight, get_isa, packed_linear
from ctp_fast.compress import magnitude_mask
w, x = torch.randn(4096, 4096), torch.randn(1, 4096)
def ms(pw):
    for _ in range(5):
        packed_linear(x, pw)
    ts = []
    for _ in range(50):
        t0 = time.perf_counter(); packed_linear(x, pw); ts.append(time.perf_counter() - t0)
    return sorted(ts)[25] * 1e3
print(f"library ({get_isa()}), 1 thread, 4096x4096 g64, median of 50:")
print(f"  dense int4           {ms(DenseWeight.pack(w, group_size=64)):.3f} ms")
for sp in (0.5, 0.75):
    u = UnstructuredWeight.pack(w, group_size=64, mask=magnitude_mask(w, sp))
    print(f"  unstructured {sp:.2f}    {ms(u):.3f} ms  {u.nbytes / w.numel():.3f} B/w")
PY
for sp in 0.5 0.75; do /tmp/ctp_lane_per_row 4096 4096 $sp; done
