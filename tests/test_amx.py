"""The AMX path (ISA amx, csrc/cpu/qlinear_amx.cpp) is taken where it should be: from M = 16 on (every group size
the formats allow is a multiple of 32, or one group per row). The kernel sweeps (test_int4_kernels, test_sparse_formats) already check its
results against the reference on every ISA; they would pass just as well if amx silently fell back to the
avx512 kernels. The tiles round the activations' hi/lo split differently from the fp32 FMA kernels, so
there the two paths agree to the tolerance but not bit for bit, and where amx must fall back they are
identical."""
from __future__ import annotations

import pytest
import torch

import ctp_fast
from ctp_fast import packed_linear, packed_linear_grad_input

from conftest import random_int4

pytestmark = [pytest.mark.usefixtures("fixed_seed", "one_thread"),
              pytest.mark.skipif("amx" not in ctp_fast.supported_isas(), reason="CPU or OS offers no AMX tiles")]


def on(isa, fn, *args):
    previous = ctp_fast.get_isa()
    ctp_fast.set_isa(isa)
    try:
        return fn(*args)
    finally:
        ctp_fast.set_isa(previous)


@pytest.mark.parametrize("m, group, tiles", [(16, 64, True), (129, 128, True), (40, -1, True), (15, 64, False), (4, 32, False)])
def test_amx_taken_where_expected(m, group, tiles):
    w = random_int4(96, 576, group, False, torch.float16, False, 0)
    x, gy = torch.randn(m, 576), torch.randn(m, 96)
    for fn, a in ((packed_linear, x), (packed_linear_grad_input, gy)):
        ours, base = on("amx", fn, a, w), on("avx512", fn, a, w)
        torch.testing.assert_close(ours, base, rtol=1e-4, atol=1e-4)
        assert torch.equal(ours, base) != tiles
