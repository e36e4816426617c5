"""Layer-level compression algorithms: rtn, gptq, sparsegpt, wanda, magnitude, and their statistics.

The calibration data has correlated columns and a few outlier channels (the regime where calibrated
methods pay off); quality is measured as the output error ||X W^T - X Wc^T|| on that data.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from ctp_fast import Sparse24Weight, UnstructuredWeight
from ctp_fast.compress import HessianAccumulator, LayerResult, wanda_mask
from ctp_fast.compress.gptq import gptq
from ctp_fast.compress.magnitude import magnitude
from ctp_fast.compress.rtn import rtn
from ctp_fast.compress.sparsegpt import sparsegpt
from ctp_fast.compress.wanda import wanda
from ctp_fast.formats import DenseWeight


# ------------------------------------------------------------------------------------------ data
@functools.lru_cache(maxsize=None)
def _problem(n_out: int, k: int, seed: int = 0, samples: int = 1024):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(k) + torch.randn(k, k, generator=g) / math.sqrt(k)  # correlated columns
    X = torch.randn(samples, k, generator=g) @ A
    X[:, torch.randperm(k, generator=g)[:4]] *= 15.0  # outlier channels
    W = torch.randn(n_out, k, generator=g) * 0.02
    acc = HessianAccumulator(k)
    acc.add(X)
    return X, W, acc.hessian(), acc.col_norms()


def problem(n_out=96, k=256, seed=0):
    X, W, H, norms = _problem(n_out, k, seed)
    return X, W.clone(), H.clone(), norms.clone()


def out_err(X, W, Wc) -> float:
    return (X @ (W - Wc).T).norm().item()


def assert_packs_exactly(res: LayerResult, fmt=None):
    packed = res.to_packed()
    if fmt is not None:
        assert type(packed) is fmt
    got = packed.unpack()
    assert (got - res.weight).norm() <= 1e-6 * res.weight.norm()
    assert int(res.codes.max()) <= 2 ** res.bits - 1
    if res.mask is not None and fmt is not Sparse24Weight:
        assert torch.equal(packed.mask(), res.mask)
    return packed


def assert_nm(mask: torch.Tensor, n: int, m: int):
    rows, k = mask.shape
    assert torch.equal(mask.view(rows, k // m, m).sum(-1), torch.full((rows, k // m), n))


# ------------------------------------------------------------------------------------------ reference ports
def reference_gptq(W, H, bits, group_size, sym, actorder, percdamp=0.01, blocksize=128):
    """A line-by-line port of GPTQ's fasterquant (IST-DASLab/gptq), fp32."""
    W, H = W.clone().float(), H.clone().float()
    maxq = 2 ** bits - 1

    def find_params(x):
        zero = torch.zeros(x.shape[0])
        xmin, xmax = torch.minimum(x.min(1).values, zero), torch.maximum(x.max(1).values, zero)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp], xmax[tmp] = -1, 1
        scale = (xmax - xmin) / maxq
        return scale, (torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale))

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Q = torch.zeros_like(W)
    idx = torch.arange(H.shape[0])
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    cols = W.shape[1]
    if group_size == -1:
        scale, zero = find_params(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if group_size != -1 and (i1 + i) % group_size == 0:
                scale, zero = find_params(W[:, i1 + i:i1 + i + group_size])
            q = scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)
            Q[:, i1 + i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q[:, torch.argsort(perm)] if actorder else Q


def reference_sparsegpt(W, H, sparsity=0.0, prunen=0, prunem=0, percdamp=0.01, blocksize=128):
    """A port of SparseGPT's fasterprune (IST-DASLab/sparsegpt), prune only, fp32; the unstructured
    block mask prunes exactly the block's share (the original thresholds with <=, one more per block)."""
    W, H = W.clone().float(), H.clone().float()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    idx = torch.arange(cols)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    total = int(rows * cols * sparsity)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros(rows, count), torch.zeros(rows, count)
        if prunen == 0:
            tmp = (W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2).flatten()
            mask1 = torch.zeros(rows * count, dtype=torch.bool)
            mask1[torch.argsort(tmp, stable=True)[:total * i2 // cols - total * i1 // cols]] = True
            mask1 = mask1.view(rows, count)
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w, d = W1[:, i], Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:i + prunem] ** 2 / torch.diag(Hinv1)[i:i + prunem].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


# ------------------------------------------------------------------------------------------ GPTQ
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 128, True), (4, 32, True), (3, 128, True),
                                                        (4, 128, False), (4, -1, True), (8, 64, True)])
def test_gptq_beats_rtn_and_packs(bits, group_size, symmetric, act_order):
    X, W, H, _ = problem()
    res = gptq(W, H, bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order)
    base = rtn(W, bits, group_size, symmetric)
    assert out_err(X, W, res.weight) < 0.9 * out_err(X, W, base.weight)
    packed = assert_packs_exactly(res, DenseWeight)
    assert packed.bits == bits and packed.symmetric == symmetric
    assert res.codes.dtype == torch.uint8 and res.scales.dtype == torch.float32
    assert res.scales.shape == (W.shape[0], 1 if group_size == -1 else W.shape[1] // group_size)
    assert (res.zeros is None) == symmetric
    assert res.mask is None and res.sparsity is None and res.loss > 0
    if act_order:
        assert torch.equal(torch.sort(res.perm).values, torch.arange(W.shape[1]))
        assert torch.equal(res.perm, torch.argsort(torch.diagonal(H), descending=True, stable=True))
        assert torch.equal(packed.perm, res.perm)
    else:
        assert res.perm is None


@pytest.mark.parametrize("bits,group_size,symmetric,act_order", [(4, 128, True, False), (4, 128, False, True),
                                                                 (3, -1, True, False), (4, -1, False, True)])
def test_gptq_matches_reference_implementation(bits, group_size, symmetric, act_order):
    X, W, H, _ = problem(64)
    ref = reference_gptq(W, H.float(), bits, group_size, symmetric, act_order)
    res = gptq(W, H, bits, group_size, symmetric, act_order, scale_dtype=torch.float32)
    assert (res.weight - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("k,group_size,act_order", [(576, 128, False), (576, 128, True), (100, 32, False)])
def test_gptq_k_not_a_multiple_of_group_size(k, group_size, act_order):
    X, W, H, _ = problem(64, k)
    res = gptq(W, H, 4, group_size, act_order=act_order)
    assert res.scales.shape == (64, math.ceil(k / group_size))
    assert_packs_exactly(res, DenseWeight)
    assert out_err(X, W, res.weight) < 0.9 * out_err(X, W, rtn(W, 4, group_size).weight)


def test_gptq_lazy_batch_updates_are_exact():
    """The block size is only an execution order: groups that straddle blocks see the pending update."""
    X, W, H, _ = problem(64, 200)
    for kwargs in (dict(group_size=32), dict(group_size=64, act_order=True, symmetric=False)):
        a = gptq(W, H, block_size=128, **kwargs)
        for bs in (8, 48, 1000):
            b = gptq(W, H, block_size=bs, **kwargs)
            assert (a.codes != b.codes).float().mean() < 0.005
            assert b.loss == pytest.approx(a.loss, rel=1e-3)


def test_gptq_deterministic_and_input_untouched():
    X, W, H, _ = problem(64)
    W0, H0 = W.clone(), H.clone()
    a = gptq(W, H, act_order=True)
    b = gptq(W, H, act_order=True)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.weight, b.weight)
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_gptq_dead_columns():
    X, W, H, _ = problem(64)
    X = X.clone()
    X[:, [3, 77]] = 0
    H = 2 / X.shape[0] * X.double().T @ X.double()
    res = gptq(W, H, act_order=True)
    assert (res.weight[:, [3, 77]] == 0).all()
    assert_packs_exactly(res)
    assert out_err(X, W, res.weight) < out_err(X, W, rtn(W).weight)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 17), (128, 96)])
def test_drop_lowest_picks_what_a_stable_sort_picks(shape, ties):
    from ctp_fast.compress.magnitude import drop_lowest

    score = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))).abs()
    if ties:
        score = (score * 2).round()  # many equal scores, zeros included
    n = score.numel()
    for drop in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        want = torch.ones(n, dtype=torch.bool)
        want[torch.argsort(score.flatten(), stable=True)[:drop]] = False
        got = drop_lowest(score, drop)
        assert got.shape == score.shape and torch.equal(got.flatten(), want), drop


@pytest.mark.parametrize("k", [1, 7, 96, 301])
def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(k):
    from ctp_fast.compress.layer import inverse_hessian_factor

    X = torch.randn(2 * k + 5, k, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    H = X.T @ X
    H[:, 0] = H[0, :] = 0  # a dead column: H_00 becomes 1 before dampening
    U, dead = inverse_hessian_factor(H, 0.01)
    Hd = H.clone()
    Hd[0, 0] = 1.0
    Hd.diagonal().add_(0.01 * Hd.diagonal().mean())
    assert dead.tolist() == [True] + [False] * (k - 1)
    assert torch.equal(U, U.triu()) and (U.diagonal() > 0).all()
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd), rtol=1e-9, atol=1e-9)
    if k > 1:
        with pytest.raises(ValueError, match="not positive definite"):
            inverse_hessian_factor(-Hd, 0.0)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_prune_then_gptq_keeps_mask(sparsity, act_order):
    X, W, H, norms = problem()
    mask = wanda_mask(W, norms, sparsity)
    res = gptq(W, H, 4, 64, act_order=act_order, mask=mask)
    assert torch.equal(res.kept, mask)
    assert (res.weight[~mask] == 0).all()
    assert res.sparsity == sparsity
    fmt = Sparse24Weight if sparsity == "2:4" and not act_order else UnstructuredWeight
    assert_packs_exactly(res, fmt)
    assert out_err(X, W, res.weight) < 0.95 * out_err(X, W, rtn(W, 4, 64, mask=mask).weight)


def test_prune_then_gptq_scales_over_kept_entries():
    """A huge pruned weight must not widen its group's range."""
    X, W, H, _ = problem(64)
    W[:, 5] = 10.0
    mask = torch.ones_like(W, dtype=torch.bool)
    mask[:, 5] = False
    res = gptq(W, H, 4, 32, mask=mask)
    assert res.scales[:, 0].max() < 0.1
    assert (res.weight[:, 5] == 0).all()


# ------------------------------------------------------------------------------------------ SparseGPT / Wanda
@pytest.mark.parametrize("sparsity", [0.5, "2:4", "4:8"])
def test_sparsegpt_and_wanda_beat_magnitude(sparsity):
    X, W, H, norms = problem()
    mag = magnitude(W, sparsity)
    sg = sparsegpt(W, H, sparsity)
    wa = wanda(W, norms, sparsity)
    e_mag = out_err(X, W, mag.weight)
    assert out_err(X, W, sg.weight) < 0.8 * e_mag
    assert out_err(X, W, wa.weight) < 0.8 * e_mag
    assert out_err(X, W, sg.weight) < out_err(X, W, wa.weight)
    n, k = W.shape
    for res in (mag, sg, wa):
        assert res.codes is None and res.bits is None and res.sparsity == sparsity
        assert res.weight.dtype == torch.float32
        assert (res.weight[~res.mask] == 0).all()
        if sparsity == 0.5:
            assert int((~res.mask).sum()) == n * k // 2
        else:
            assert_nm(res.mask, *map(int, sparsity.split(":")))
        with pytest.raises(ValueError, match="not quantized"):
            res.to_packed()
    if sparsity == 0.5:  # Wanda's comparison group is the output row
        assert torch.equal((~wa.mask).sum(1), torch.full((n,), k // 2))


@pytest.mark.parametrize("sparsity,nm", [(0.5, (0, 0)), (0.37, (0, 0)), ("2:4", (2, 4)), ("4:8", (4, 8))])
def test_sparsegpt_matches_reference_implementation(sparsity, nm):
    X, W, H, _ = problem(64, 200 if sparsity == 0.37 else 256)
    ref = reference_sparsegpt(W, H.float(), sparsity if nm == (0, 0) else 0.0, prunen=nm[1] - nm[0] if nm[0] else 0,
                              prunem=nm[1])
    res = sparsegpt(W, H, sparsity)
    assert torch.equal(res.mask, ref != 0)
    assert (res.weight - ref).abs().max() <= 1e-6
    if sparsity == 0.37:
        assert int((~res.mask).sum()) == int(64 * 200 * 0.37)


@pytest.mark.parametrize("sparsity,fmt", [(0.5, UnstructuredWeight), ("2:4", Sparse24Weight),
                                          ("4:8", UnstructuredWeight)])
def test_sparsegpt_joint_4bit(sparsity, fmt):
    X, W, H, _ = problem()
    res = sparsegpt(W, H, sparsity, bits=4, group_size=128)
    assert res.bits == 4 and res.sparsity == sparsity and res.perm is None
    packed = assert_packs_exactly(res, fmt)
    assert (res.weight[~res.mask] == 0).all()
    assert (res.codes[~res.mask] == 8).all()  # pruned entries hold the zero point
    if sparsity == 0.5:
        assert int((~res.mask).sum()) == W.numel() // 2
        assert packed.sparsity == 0.5
    else:
        assert_nm(res.mask, *map(int, sparsity.split(":")))
    base = magnitude(W, sparsity, bits=4, group_size=128)
    assert_packs_exactly(base, fmt)
    assert out_err(X, W, res.weight) < 0.8 * out_err(X, W, base.weight)
    # quantizing in the sweep costs little over pruning alone
    assert out_err(X, W, res.weight) < 1.5 * out_err(X, W, sparsegpt(W, H, sparsity).weight)


def test_sparsegpt_joint_asymmetric_small_groups():
    X, W, H, _ = problem(64)
    res = sparsegpt(W, H, "2:4", bits=4, group_size=32, symmetric=False)
    assert res.zeros is not None and res.scales.shape == (64, 8)
    assert_packs_exactly(res, Sparse24Weight)
    assert out_err(X, W, res.weight) < out_err(X, W, magnitude(W, "2:4", bits=4, group_size=32,
                                                                symmetric=False).weight)


def test_wanda_quantized_and_mask_rule():
    X, W, H, norms = problem(64)
    res = wanda(W, norms, 0.5, bits=4, group_size=64)
    score = W.abs() * norms.float()
    thresh = score.sort(dim=1).values[:, W.shape[1] // 2 - 1: W.shape[1] // 2]
    assert torch.equal(res.mask, score > thresh)
    assert_packs_exactly(res, UnstructuredWeight)
    assert out_err(X, W, res.weight) < out_err(X, W, magnitude(W, 0.5, bits=4, group_size=64).weight)


# ------------------------------------------------------------------------------------------ statistics, results
def test_hessian_accumulator_chunks_equal_one_shot():
    X = _problem(96, 256)[0]
    acc = HessianAccumulator(256)
    acc.add(X[:100])
    acc.add(X[100:100])  # empty
    acc.add(X[100:612].view(4, 128, 256))  # [batch, seq, K]
    acc.add(X[612:])
    X64 = X.double()
    assert acc.n == X.shape[0]
    expect = 2 / X.shape[0] * X64.T @ X64
    assert (acc.hessian() - expect).abs().max() <= 1e-12 * expect.abs().max()
    assert torch.allclose(acc.col_norms(), X64.norm(dim=0), rtol=1e-12)
    acc32 = HessianAccumulator(256, dtype=torch.float32)
    for chunk in X.split(300):
        acc32.add(chunk)
    assert acc32.hessian().dtype == torch.float32
    assert (acc32.hessian().double() - expect).abs().max() <= 1e-5 * expect.abs().max()
    lite = HessianAccumulator(256, hessian=False)
    lin = torch.nn.Linear(256, 8)
    handle = lin.register_forward_hook(lite.hook)
    with torch.no_grad():
        lin(X[:512].view(2, 256, 256))
        lin(X[512:])
    handle.remove()
    assert torch.allclose(lite.col_norms(), X64.norm(dim=0), rtol=1e-12)
    with pytest.raises(ValueError, match="hessian=False"):
        lite.hessian()


def test_scale_dtype_and_modules():
    X, W, H, _ = problem(64)
    res = gptq(W, H)  # fp16 scales
    assert torch.equal(res.scales.half().float(), res.scales)
    assert torch.equal(res.to_packed(torch.float32).unpack(), res.weight)
    with pytest.raises(ValueError, match="scale_dtype"):
        res.to_packed(torch.bfloat16)
    bf = gptq(W, H, scale_dtype=torch.bfloat16)
    assert bf.to_packed().scales.dtype == torch.bfloat16
    assert_packs_exactly(bf)
    bias = torch.randn(64)
    x = X[:4]
    lin = res.to_module(bias)
    assert torch.allclose(lin(x), torch.nn.functional.linear(x, res.weight, bias), atol=1e-4, rtol=1e-4)
    dense = sparsegpt(W, H, 0.5).to_module(bias)
    assert isinstance(dense, torch.nn.Linear)
    assert torch.equal(dense.weight.data, sparsegpt(W, H, 0.5).weight)


def test_layer_result_pruned():
    X, W, H, norms = problem(64)
    mask = wanda_mask(W, norms, "2:4")
    res = LayerResult.pruned(W.half(), mask)
    assert res.sparsity == "2:4" and res.codes is None and res.weight.dtype == torch.float32
    assert torch.equal(res.weight, W.half().float() * mask)
    assert LayerResult.pruned(W, mask, 0.5).sparsity == 0.5
    dense = LayerResult.pruned(W, None)
    assert dense.mask is None and torch.equal(dense.weight, W) and dense.weight is not W
    with pytest.raises(ValueError, match="not quantized"):
        res.to_packed()


def test_submodules_are_not_shadowed():
    import ctp_fast.compress as c
    from ctp_fast.compress import gptq as gptq_mod, sparsegpt as sparsegpt_mod, wanda as wanda_mod

    assert gptq_mod.gptq is gptq and sparsegpt_mod.sparsegpt is sparsegpt and wanda_mod.wanda is wanda
    assert c.rtn.rtn is rtn and c.magnitude.magnitude is magnitude


def test_bad_inputs():
    X, W, H, norms = problem(64)
    with pytest.raises(ValueError, match="H"):
        gptq(W, H[:-1, :-1])
    with pytest.raises(ValueError, match="H"):
        sparsegpt(W, H[:, :-1], 0.5)
    with pytest.raises(ValueError, match="H"):
        gptq(W, torch.zeros_like(H))
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            sparsegpt(W, H, bad)
        with pytest.raises(ValueError, match="sparsity"):
            wanda(W, norms, bad)
    for bad in ("3:4", "2:8", "half"):
        with pytest.raises(ValueError, match="sparsity"):
            sparsegpt(W, H, bad)
        with pytest.raises(ValueError, match="sparsity"):
            wanda_mask(W, norms, bad)
    for fn in (lambda: rtn(W, bits=5), lambda: gptq(W, H, bits=5), lambda: sparsegpt(W, H, 0.5, bits=5),
               lambda: wanda(W, norms, 0.5, bits=2), lambda: magnitude(W, 0.5, bits=16), lambda: gptq(W, H, bits=None)):
        with pytest.raises(ValueError, match="bits"):
            fn()
    with pytest.raises(ValueError, match="group_size"):
        gptq(W, H, group_size=100)
    with pytest.raises(ValueError, match="mask"):
        gptq(W, H, mask=torch.ones(64, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="col_norms"):
        wanda(W, norms[:-1], 0.5)
    with pytest.raises(ValueError, match="damp"):
        gptq(W, H, damp=-1)
    with pytest.raises(ValueError, match="block_size"):
        sparsegpt(W, H, "4:8", block_size=4)
    with pytest.raises(ValueError, match="in_features"):
        sparsegpt(W[:, :254], H[:254, :254], "2:4")
    with pytest.raises(ValueError, match="weight"):
        gptq(W[0], H)
    with pytest.raises(ValueError, match="x"):
        HessianAccumulator(256).add(torch.randn(3, 255))
    with pytest.raises(ValueError, match="no calibration"):
        HessianAccumulator(256).hessian()
