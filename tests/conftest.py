"""Shared fixtures and helpers for the ctp_fast test-suite.

`isa` runs a test once per instruction-set path this CPU supports (scalar, avx2, avx512, avx512bf16, amx) and restores
the previous choice afterwards, so that test order never leaks an ISA into another test.
"""
from __future__ import annotations

import math

import pytest
import torch

import ctp_fast
from ctp_fast import Int4Weight

SUPPORTED_ISAS = ctp_fast.supported_isas()


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    try:
        previous = ctp_fast.get_isa()
    except RuntimeError:  # e.g. CTP_FAST_ISA set to something unusable in the parent environment
        previous = None
    ctp_fast.set_isa(request.param)
    assert ctp_fast.get_isa() == request.param
    yield request.param
    if previous is not None:
        ctp_fast.set_isa(previous)


def kernel_weight(W: torch.Tensor, dtype: torch.dtype, m: int) -> torch.Tensor:
    """The weight the CPU kernels multiply activations of this dtype and m rows by, for the reference:
    W itself, or on the bf16 dot-product path (ctp_fast.ops.bf16_gemm) W rounded to bf16 from its fp32
    dequantized values, as the kernels round it."""
    if dtype == torch.bfloat16 and ctp_fast.ops.bf16_gemm(m):
        return W.float().bfloat16().to(W.dtype)
    return W


def _single_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def one_thread():
    """One intra-op thread. On this shared 2-core machine, 2 OpenMP threads spin-wait on each other when
    other jobs run (the kernel tests go from ~20 s to ~150 s). The parallel path is tested explicitly
    with `two_threads`."""
    yield from _single_intra_op_thread()


@pytest.fixture(scope="module")
def one_thread_per_module():
    """`one_thread` for a whole test module (its tiny models make thread hand-offs the main cost)."""
    yield from _single_intra_op_thread()


@pytest.fixture
def two_threads(one_thread):
    """Two intra-op threads (at::parallel_for splits the kernel tasks between them)."""
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    yield


@pytest.fixture
def fixed_seed():
    """Seed the global RNG before each test (used by this suite's modules via pytestmark)."""
    torch.manual_seed(0)
    yield


def random_int4(n: int, k: int, group_size: int, symmetric: bool, scale_dtype=torch.float16,
                act_order: bool = False, seed: int = 0) -> Int4Weight:
    """An Int4Weight with random codes 0..15, random positive scales and random zero points
    (all of 0..15, so every code/zero combination the kernels must handle is exercised)."""
    gen = torch.Generator().manual_seed(seed)
    g = k if group_size == -1 else group_size
    groups = math.ceil(k / g)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = torch.rand(n, groups, generator=gen) * 0.1 + 0.01
    scales = scales * torch.where(torch.rand(n, groups, generator=gen) < 0.5, -1.0, 1.0)  # GPTQ allows any sign
    zeros = None if symmetric else torch.randint(0, 16, (n, groups), generator=gen)
    perm = torch.randperm(k, generator=gen) if act_order else None
    return Int4Weight.from_codes(codes, scales, zeros, group_size, perm, scale_dtype)


def error_scale(w: Int4Weight) -> torch.Tensor:
    """(q + z) |s| per element [N, K] (float64, original column order).

    The small-M kernel folds the zero point, y = s (sum_k q x - z sum_k x), so its fp32 rounding error
    scales with sum_k (q + z) |s| |x_k| rather than with sum_k |W_nk| |x_k| = sum_k |q - z| |s| |x_k|.
    For RTN weights (codes near the zero point) this is 4-10x larger. It is always >= |W|.
    """
    n, k = w.out_features, w.in_features
    col_group = torch.arange(k) // w.kernel_group_size
    s = w.scales.permute(0, 2, 1).reshape(-1, w.ngroups)[:n].double()[:, col_group].abs()
    z = 8.0 if w.zeros is None else w.zeros.permute(0, 2, 1).reshape(-1, w.ngroups)[:n].double()[:, col_group]
    f = (w.codes().double() + z) * s
    if w.perm is not None:
        f = torch.empty_like(f).index_copy_(1, w.perm, f)
    return f
