"""Int4Weight (the dense 4-bit format, DenseWeight with bits=4): RTN quantization, packing layout, the unpack
reference, nbytes and the state-dict format."""
from __future__ import annotations

import math

import pytest
import torch

from ctp_fast import Int4Weight
from ctp_fast.formats.base import FORMAT_VERSION, quantize

from conftest import random_int4

pytestmark = pytest.mark.usefixtures("fixed_seed", "one_thread")

GROUPS = [32, 64, 128, -1]
SHAPES = [(33, 40), (64, 256), (70, 129), (5, 300)]  # N, K; K not a multiple of every group size
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def per_row(t, n):
    """[blocks, G, 32] -> [N, G] (written independently of Int4Weight._per_row)."""
    blocks, groups, _ = t.shape
    return t.transpose(1, 2).reshape(blocks * 32, groups)[:n]


def column_groups(k, g):
    return torch.arange(k) // (k if g == -1 else g)


# ------------------------------------------------------------------------------------------- RTN round trip
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["s_fp32", "s_fp16", "s_bf16"])
@pytest.mark.parametrize("act", [False, True], ids=["noperm", "actorder"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rtn_error_bounded_by_half_scale(shape, g, sym, act, scale_dtype):
    """|W - unpack| <= scale / 2 per element.

    Round to nearest is off by at most half a step. The symmetric grid (scale = 2 max|w| / 15,
    zero 8, codes 0..15) only reaches +7 scale, so +max|w| = 7.5 scale is clipped to 7 scale: an error
    of exactly scale / 2 as well (checked separately below). The stored scale is rounded to
    `scale_dtype`, which moves a value (q - z) * s by |q - z| <= 15 times that rounding (unit roundoff u):
    bound s (1/2 + 16 u), plus fp32 evaluation slack.
    """
    n, k = shape
    wt = torch.randn(n, k) * torch.rand(n, 1) * 3  # rows of different magnitudes
    wt[0, : k // 2] = 0  # an all-zero group (scale 0 is replaced by 1)
    perm = torch.randperm(k) if act else None
    w = Int4Weight.pack(wt, group_size=g, symmetric=sym, scale_dtype=scale_dtype, perm=perm)
    assert w.scales.dtype == scale_dtype and w.symmetric == sym and w.group_size == g
    deq = w.unpack()
    assert deq.shape == (n, k) and deq.dtype == torch.float32
    # the stored scale of every (original) column
    s = per_row(w.scales, n).float()  # [N, G] over packed columns
    col_scale = torch.empty(n, k)
    col_scale[:, perm if act else torch.arange(k)] = s[:, column_groups(k, g)]
    bound = col_scale.abs() * (0.5 + 16 * UNIT_ROUNDOFF[scale_dtype]) + 1e-6 * wt.abs()
    err = (wt - deq).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    assert torch.all(deq[wt == 0] == 0)  # 0 is always on the grid (ranges are widened to include it)
    # the bound is tight (RTN does hit nearly half a step somewhere), so it is not vacuous
    assert (err / col_scale.abs()).max() > 0.4


@pytest.mark.parametrize("g", GROUPS)
def test_symmetric_max_is_clipped_to_seven_steps(g):
    n, k = 8, 128
    wt = torch.randn(n, k)
    gs = k if g == -1 else g
    # make the largest magnitude of each group positive
    wv = wt.view(n, k // gs, gs)
    idx = wv.abs().argmax(-1, keepdim=True)
    wv.scatter_(-1, idx, wv.abs().gather(-1, idx))
    w = Int4Weight.pack(wt, group_size=g, symmetric=True, scale_dtype=torch.float32)
    codes = w.codes().view(n, k // gs, gs)
    s = per_row(w.scales, n)  # [N, G]
    amax = wv.abs().amax(-1)
    torch.testing.assert_close(s, 2 * amax / 15)
    # the max maps to the top code 15 = +7 steps: clipped by scale/2 (7.5 steps would be needed)
    assert torch.all(codes.gather(-1, idx).squeeze(-1) == 15)
    deq = w.unpack().view(n, k // gs, gs).gather(-1, idx).squeeze(-1)
    torch.testing.assert_close(deq, 7 * s)
    torch.testing.assert_close(amax - deq, s / 2)
    # the most negative representable value is -8 steps; -max|w| maps to code 0 or 1
    assert codes.min() >= 0 and codes.max() <= 15


def rtn_quantize(weight, group_size, symmetric):
    return quantize(weight, 4, group_size, symmetric)


def test_rtn_quantize_conventions():
    wt = torch.tensor([[-1.0, 0.5, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0], [0.25, 0.75, 3.0, 7.5]])
    codes, scale, zero = rtn_quantize(wt, 4, symmetric=True)
    torch.testing.assert_close(scale[:, 0], torch.tensor([6 / 15, 1.0, 15 / 15]))
    assert torch.all(zero == 8)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 4)
    codes, scale, zero = rtn_quantize(wt, 4, symmetric=False)
    # range widened to include 0: [-1, 3] -> scale 4/15, zero round(1 / (4/15)) = 4; [0, 7.5] -> zero 0
    torch.testing.assert_close(scale[:, 0], torch.tensor([4 / 15, 1.0, 0.5]))
    assert zero[:, 0].tolist() == [4, 0, 0]
    assert codes[0].tolist() == [0, 6, 11, 15]  # w/s + zero 4: -3.75 -> -4, 1.875 -> 2, 7.4999 (fp32) -> 7, 11.25 -> 11
    assert codes[2].tolist() == [0, 2, 6, 15]  # 0.5 -> 0 and 1.5 -> 2 (round half to even), 6, 15
    assert codes[1].tolist() == [0, 0, 0, 0]


# ------------------------------------------------------------------------------------------- codes and layout
@pytest.mark.parametrize("shape", [(1, 1), (31, 7), (32, 32), (33, 40), (70, 129)], ids=str)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("g", GROUPS)
def test_from_codes_round_trip_and_layout(shape, sym, g):
    n, k = shape
    gs = k if g == -1 else g
    groups = math.ceil(k / gs)
    codes = torch.randint(0, 16, (n, k))
    scales = torch.randn(n, groups)
    zeros = None if sym else torch.randint(0, 16, (n, groups))
    perm = torch.randperm(k)
    w = Int4Weight.from_codes(codes, scales, zeros, g, perm, torch.float32)
    # codes() recovers the codes exactly (packed column order), as int16
    c = w.codes()
    assert c.dtype == torch.int16 and torch.equal(c, codes.to(torch.int16))
    # the documented byte layout: qweight[b, j, i] = q[32b + i, j] | q[32b + 16 + i, j] << 4, padding rows 0
    blocks = math.ceil(n / 32)
    assert w.qweight.shape == (blocks, k, 16) and w.qweight.dtype == torch.uint8
    padded = torch.zeros(blocks * 32, k, dtype=torch.int64)
    padded[:n] = codes
    for b in range(blocks):
        lo = padded[32 * b: 32 * b + 16].T
        hi = padded[32 * b + 16: 32 * b + 32].T
        assert torch.equal(w.qweight[b].long(), lo | (hi << 4))
    assert w.scales.shape == (blocks, groups, 32)
    assert torch.equal(per_row(w.scales, blocks * 32)[n:], torch.zeros(blocks * 32 - n, groups))
    assert torch.equal(per_row(w.scales, n), scales)
    if not sym:
        assert w.zeros.shape == (blocks, groups, 32) and w.zeros.dtype == torch.uint8
        assert torch.equal(per_row(w.zeros, n).long(), zeros)
    # unpack: W[n, perm[j]] = (q[n, j] - zero[n, j // g]) * scale[n, j // g], written out element-wise
    # (an exact integer times an fp32 scale, rounded once to fp32: bit-exact)
    cg = column_groups(k, g)
    z = torch.full((n, groups), 8) if sym else zeros
    dense_packed_order = (codes - z[:, cg]).float() * scales[:, cg]
    expect = torch.empty(n, k)
    for j in range(k):
        expect[:, perm[j]] = dense_packed_order[:, j]
    torch.testing.assert_close(w.unpack(), expect, rtol=0, atol=0)
    torch.testing.assert_close(w.unpack(torch.float64), expect.double(), rtol=0, atol=0)
    assert w.unpack(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("g", GROUPS)
def test_act_order_perm_is_honoured(g):
    n, k = 40, 96
    wt = torch.randn(n, k)
    perm = torch.randperm(k)
    w = Int4Weight.pack(wt, group_size=g, symmetric=False, scale_dtype=torch.float32, perm=perm)
    assert torch.equal(w.perm, perm) and w.perm.dtype == torch.int64
    plain = Int4Weight.pack(wt[:, perm], group_size=g, symmetric=False, scale_dtype=torch.float32)
    # groups are formed over the permuted columns: same codes/scales as packing the permuted matrix
    assert torch.equal(w.codes(), plain.codes())
    assert torch.equal(w.scales, plain.scales)
    # and unpack returns the original column order
    torch.testing.assert_close(w.unpack()[:, perm], plain.unpack(), rtol=0, atol=0)
    assert (w.unpack() - wt).abs().max() <= per_row(w.scales, n).abs().max() * 0.51
    # a perm given as int32 / a list is accepted and stored as int64
    w32 = Int4Weight.pack(wt, group_size=g, perm=perm.to(torch.int32))
    assert w32.perm.dtype == torch.int64 and torch.equal(w32.perm, perm)


def test_act_order_groups_follow_the_permutation():
    """Columns brought together by perm share a scale: put the big columns in one permuted group."""
    n, k = 4, 64
    wt = torch.randn(n, k) * 0.01
    big = torch.arange(0, k, 2)  # even columns are large
    wt[:, big] *= 100
    perm = torch.cat([big, torch.arange(1, k, 2)])  # packed group 0 = even columns, group 1 = odd
    w = Int4Weight.pack(wt, group_size=32, symmetric=True, scale_dtype=torch.float32, perm=perm)
    s = per_row(w.scales, n)
    torch.testing.assert_close(s[:, 0], 2 * wt[:, big].abs().amax(1) / 15)
    torch.testing.assert_close(s[:, 1], 2 * wt[:, 1::2].abs().amax(1) / 15)
    # small columns keep their precision because they do not share a scale with the big ones
    assert ((w.unpack() - wt)[:, 1::2].abs() <= s[:, 1:2] / 2 + 1e-7).all()


def test_short_last_group():
    n, k, g = 3, 40, 32  # groups of 32 and 8
    wt = torch.randn(n, k)
    wt[:, 32:] = torch.tensor([0.5, -0.25, 0.125, 0.1, 0.2, 0.3, -0.4, 0.05])
    for sym in (True, False):
        w = Int4Weight.pack(wt, group_size=g, symmetric=sym, scale_dtype=torch.float32)
        assert w.ngroups == 2 and w.scales.shape == (1, 2, 32)
        s = per_row(w.scales, n)
        expect = 2 * 0.5 / 15 if sym else (0.5 + 0.4) / 15  # only the 8 real columns count
        torch.testing.assert_close(s[:, 1], torch.full((n,), expect))
        assert ((w.unpack() - wt).abs() <= s[:, column_groups(k, g)] / 2 + 1e-7).all()
        assert w.kernel_group_size == 32
    # all-negative short group, asymmetric: range widened to include 0 only (not by padding)
    wt[:, 32:] = -torch.linspace(0.1, 1.5, 8)
    w = Int4Weight.pack(wt, group_size=g, symmetric=False, scale_dtype=torch.float32)
    torch.testing.assert_close(per_row(w.scales, n)[:, 1], torch.full((n,), 1.5 / 15))
    assert torch.all(per_row(w.zeros, n)[:, 1] == 15)


def test_per_channel_group():
    w = Int4Weight.pack(torch.randn(10, 77), group_size=-1)
    assert w.group_size == -1 and w.kernel_group_size == 77 and w.ngroups == 1
    assert w.scales.shape == (1, 1, 32)


# ------------------------------------------------------------------------------------------- nbytes
def test_nbytes_formula_llama_sized():
    n = k = 4096
    g = 128
    codes = torch.zeros(n, k, dtype=torch.uint8)
    w = Int4Weight.from_codes(codes, torch.ones(n, k // g), None, g, scale_dtype=torch.float16)
    assert w.nbytes == 4096 * 4096 // 2 + 4096 * 32 * 2 == 8_650_752
    assert abs(w.nbytes / (n * k) - 0.5156) < 1e-3
    wa = Int4Weight.from_codes(codes, torch.ones(n, k // g), torch.zeros(n, k // g, dtype=torch.uint8), g,
                               perm=torch.arange(k), scale_dtype=torch.float32)
    # + fp32 scales, + uint8 zeros, + int64 perm
    assert wa.nbytes == n * k // 2 + n * 32 * 4 + n * 32 + k * 8


@pytest.mark.parametrize("n,k,g,sym,sd,act", [
    (33, 40, 32, True, torch.float16, False),
    (33, 40, 32, False, torch.bfloat16, True),
    (100, 129, 64, False, torch.float32, False),
    (64, 300, -1, True, torch.float32, True),
])
def test_nbytes_counts_padding(n, k, g, sym, sd, act):
    w = Int4Weight.pack(torch.randn(n, k), group_size=g, symmetric=sym, scale_dtype=sd,
                        perm=torch.randperm(k) if act else None)
    rows = math.ceil(n / 32) * 32
    groups = math.ceil(k / (k if g == -1 else g))
    esize = torch.empty((), dtype=sd).element_size()
    expect = rows * k // 2 + rows * groups * esize + (0 if sym else rows * groups) + (k * 8 if act else 0)
    assert w.nbytes == expect


# ------------------------------------------------------------------------------------------- state dict
@pytest.mark.parametrize("sd", [torch.float32, torch.float16, torch.bfloat16], ids=["s_fp32", "s_fp16", "s_bf16"])
@pytest.mark.parametrize("act", [False, True], ids=["noperm", "actorder"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("g", GROUPS)
def test_state_dict_round_trip(g, sym, act, sd, tmp_path):
    w = Int4Weight.pack(torch.randn(45, 70), group_size=g, symmetric=sym, scale_dtype=sd,
                        perm=torch.randperm(70) if act else None)
    state = w.state_dict()
    assert w.bits == 4 and w.FORMAT == "dense"
    assert state["config"] == {"format": "dense", "version": FORMAT_VERSION, "bits": 4, "group_size": g,
                               "symmetric": sym, "act_order": act, "in_features": 70, "out_features": 45}
    assert set(state) == {"qweight", "scales", "config"} | ({"zeros"} if not sym else set()) | (
        {"perm"} if act else set())
    path = tmp_path / "w.pt"
    torch.save(state, path)
    w2 = Int4Weight.from_state_dict(torch.load(path, weights_only=True))
    assert type(w2) is Int4Weight
    assert (w2.out_features, w2.in_features, w2.group_size, w2.symmetric, w2.bits) == (45, 70, g, sym, 4)
    for key in ("qweight", "scales", "zeros", "perm"):
        a, b = getattr(w, key), getattr(w2, key)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), key
    assert torch.equal(w.unpack(), w2.unpack())


def _state(sym=False, act=True, n=40, k=70, g=32):
    return Int4Weight.pack(torch.randn(n, k), group_size=g, symmetric=sym, scale_dtype=torch.float16,
                           perm=torch.randperm(k) if act else None).state_dict()


def _with_config(state, **changes):
    return {**state, "config": {**state["config"], **changes}}


QW = r"qweight: expected torch.uint8 "  # the layout check names qweight, its expected dtype and shape
BAD_STATES = {
    "no_config": (lambda s: {k: v for k, v in s.items() if k != "config"}, "not a ctp_fast packed weight"),
    "wrong_format": (lambda s: _with_config(s, format="nf4"), "not a ctp_fast packed weight.*nf4"),
    "wrong_version": (lambda s: _with_config(s, version=2), "version 2 is not supported"),
    "missing_qweight": (lambda s: {k: v for k, v in s.items() if k != "qweight"}, "missing 'qweight'"),
    "missing_scales": (lambda s: {k: v for k, v in s.items() if k != "scales"}, "missing 'scales'"),
    "qweight_dtype": (lambda s: {**s, "qweight": s["qweight"].to(torch.int8)}, QW + r"\(2, 70, 16\).*got torch.int8"),
    "qweight_truncated_k": (lambda s: {**s, "qweight": s["qweight"][:, :-1]}, QW + r"\(2, 70, 16\).*got torch.uint8 \(2, 69, 16\)"),
    "qweight_truncated_blocks": (lambda s: {**s, "qweight": s["qweight"][:1]}, QW + r"\(2, 70, 16\)"),
    "qweight_truncated_bytes": (lambda s: {**s, "qweight": s["qweight"][..., :8]}, QW + r"\(2, 70, 16\)"),
    "qweight_flat": (lambda s: {**s, "qweight": s["qweight"].flatten()}, QW),
    "qweight_0d": (lambda s: {**s, "qweight": s["qweight"].flatten()[0]}, QW),
    "scales_shape": (lambda s: {**s, "scales": s["scales"][:, :1]}, r"scales: expected .*\(2, 3, 32\)"),
    "scales_truncated_lanes": (lambda s: {**s, "scales": s["scales"][..., :16]}, "scales: expected"),
    "scales_dtype_f64": (lambda s: {**s, "scales": s["scales"].double()}, "scales: expected float32/float16/bfloat16"),
    "scales_dtype_int": (lambda s: {**s, "scales": s["scales"].to(torch.int32)}, "scales: expected"),
    "zeros_but_symmetric": (lambda s: _with_config(s, symmetric=True), "zeros: config says symmetric=True"),
    "no_zeros_but_asymmetric": (lambda s: {k: v for k, v in s.items() if k != "zeros"}, "zeros: config says symmetric=False"),
    "zeros_dtype": (lambda s: {**s, "zeros": s["zeros"].to(torch.int32)}, "zeros: expected uint8"),
    "zeros_truncated": (lambda s: {**s, "zeros": s["zeros"][:, :, :31]}, "zeros: expected uint8"),
    "perm_duplicate": (lambda s: {**s, "perm": torch.cat([s["perm"][:-1], s["perm"][:1]])}, "perm: expected a permutation"),
    "perm_out_of_range": (lambda s: {**s, "perm": s["perm"] + 1}, "perm: expected a permutation"),
    "perm_truncated": (lambda s: {**s, "perm": s["perm"][:-1]}, "perm: expected an integer permutation"),
    "perm_float": (lambda s: {**s, "perm": s["perm"].float()}, "perm: expected an integer permutation"),
    "perm_but_no_act_order": (lambda s: _with_config(s, act_order=False), "perm: config says act_order=False"),
    "no_perm_but_act_order": (lambda s: {k: v for k, v in s.items() if k != "perm"}, "perm: config says act_order=True"),
    "wrong_in_features": (lambda s: _with_config(s, in_features=71), QW + r"\(2, 71, 16\)"),
    "wrong_out_features": (lambda s: _with_config(s, out_features=100), QW + r"\(4, 70, 16\)"),
    "wrong_bits": (lambda s: _with_config(s, bits=8), r"qweight: expected torch.uint8 \(2, 70, 32\)"),
    "unsupported_bits": (lambda s: _with_config(s, bits=5), r"bits: the dense format stores"),
    "wrong_group_size": (lambda s: _with_config(s, group_size=48), "group_size"),
    "config_group_size_mismatch": (lambda s: _with_config(s, group_size=64), "scales: expected"),
    "config_missing_key": (lambda s: {**s, "config": {k: v for k, v in s["config"].items() if k != "in_features"}},
                           "config is missing 'in_features'"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_from_state_dict_rejects(case):
    corrupt, message = BAD_STATES[case]
    state = _state()
    Int4Weight.from_state_dict(state)  # the uncorrupted state loads
    with pytest.raises(ValueError, match=message):
        Int4Weight.from_state_dict(corrupt(state))


# ------------------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("g", [48, 0, 16, 256, -2, 100])
def test_pack_rejects_group_size(g):
    with pytest.raises(ValueError, match="group_size: expected one of"):
        Int4Weight.pack(torch.randn(8, 64), group_size=g)
    with pytest.raises(ValueError, match="group_size"):
        Int4Weight.from_codes(torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 1), None, g)


@pytest.mark.parametrize("bad,message", [
    (torch.randn(64), "weight: expected a 2-D"),
    (torch.randn(2, 8, 64), "weight: expected a 2-D"),
    (torch.randint(0, 5, (8, 64)), "weight: expected a floating-point"),
    (torch.randn(0, 64), "weight: expected a non-empty"),
    (torch.tensor([[1.0, float("nan")]]), "weight: contains NaN"),
    (torch.tensor([[1.0, float("inf")]]), "weight: contains NaN or infinity"),
])
def test_pack_rejects_weight(bad, message):
    with pytest.raises(ValueError, match=message):
        Int4Weight.pack(bad, group_size=32)


def test_pack_rejects_perm():
    wt = torch.randn(8, 64)
    with pytest.raises(ValueError, match="perm: expected a permutation"):
        Int4Weight.pack(wt, perm=torch.zeros(64, dtype=torch.int64))
    with pytest.raises(ValueError, match="perm: expected an integer permutation of range\\(64\\)"):
        Int4Weight.pack(wt, perm=torch.arange(63))
    with pytest.raises(ValueError, match="perm: expected an integer"):
        Int4Weight.pack(wt, perm=torch.arange(64.0))


def test_from_codes_rejects():
    codes = torch.randint(0, 16, (8, 64))
    with pytest.raises(ValueError, match="codes: 4-bit codes must lie in 0..15"):
        Int4Weight.from_codes(codes + 1, torch.ones(8, 2), None, 32)
    with pytest.raises(ValueError, match="codes: 4-bit codes must lie in 0..15"):
        Int4Weight.from_codes(codes - 1, torch.ones(8, 2), None, 32)
    with pytest.raises(ValueError, match="codes: expected a 2-D"):
        Int4Weight.from_codes(codes.flatten(), torch.ones(8, 2), None, 32)
    with pytest.raises(ValueError, match="scales: expected shape \\(8, 2\\)"):
        Int4Weight.from_codes(codes, torch.ones(8, 3), None, 32)
    with pytest.raises(ValueError, match="zeros: expected shape \\(8, 2\\)"):
        Int4Weight.from_codes(codes, torch.ones(8, 2), torch.zeros(8, 1), 32)
    with pytest.raises(ValueError, match="scale_dtype"):
        Int4Weight.from_codes(codes, torch.ones(8, 2), None, 32, scale_dtype=torch.float64)


def test_validate_catches_edited_weight():
    w = random_int4(40, 70, 32, False)
    w.validate(expect_symmetric=False, expect_act_order=False)
    w.scales = w.scales[:, :1].contiguous()
    with pytest.raises(ValueError, match="scales"):
        w.validate()
