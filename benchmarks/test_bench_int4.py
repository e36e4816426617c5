"""pytest-benchmark suite: our int4 kernels against torch baselines on a small set of shapes.

Not part of the normal test run (pyproject's testpaths = ["tests"]); run it explicitly:

    pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-columns=min,median,mean,stddev,rounds

Each (op, shape, M) is one benchmark group, so pytest-benchmark compares ours / fp32 / bf16 /
torch int4 side by side. Weights are cycled over distinct copies whose total exceeds 4x the
last-level cache (as in bench_int4.py), so calls stream their weight from memory.
"""
from __future__ import annotations

import itertools
import os
import sys

import pytest

pytest.importorskip("pytest_benchmark")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_int4 as bi  # noqa: E402

SHAPES = [(4096, 4096)]
MS = [1, 64]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def shape_weights(request):
    n, k = request.param
    llc, _ = bi.llc_bytes()
    ws = bi.build_shape(n, k, target=4 * llc, max_layers=64, mem_cap=1 << 30)
    yield n, k, ws
    del ws


def _run(benchmark, fns, method, nlayers, group, weight_bytes):
    import torch

    fn = fns[method]
    counter = itertools.count()
    call = lambda: fn(next(counter))  # noqa: E731  cycles over the layers
    for _ in range(nlayers):  # warm-up: one pass over the layers
        call()
    benchmark.group = group
    benchmark.extra_info.update({"layers": nlayers, "ours_weight_bytes": weight_bytes,
                                 "threads": torch.get_num_threads(), "isa": bi.get_isa()})
    benchmark(call)


@pytest.mark.parametrize("method", bi.FWD_METHODS)
@pytest.mark.parametrize("m", MS, ids=lambda m: f"M{m}")
def test_fwd(benchmark, shape_weights, m, method):
    import torch

    n, k, ws = shape_weights
    fns = bi.fwd_fns(torch.randn(m, k), ws["layers"])
    _run(benchmark, fns, method, ws["info"][method]["layers"], f"fwd {n}x{k} M={m}",
         ws["info"]["ours"]["bytes_per_layer"])


@pytest.mark.parametrize("method", bi.GRAD_METHODS)
@pytest.mark.parametrize("m", MS, ids=lambda m: f"M{m}")
def test_grad_input(benchmark, shape_weights, m, method):
    import torch

    if method == "bf16" and m > 8:
        pytest.skip("gy_bf16 @ Wb takes torch's slow path here (~8 s a call at M=64); bf16T is the fast layout")
    n, k, ws = shape_weights
    fns = bi.grad_fns(torch.randn(m, n), ws["layers"])
    _run(benchmark, fns, method, ws["info"][method]["layers"], f"grad_input {n}x{k} M={m}",
         ws["info"]["ours"]["bytes_per_layer"])
