"""A lane-by-lane emulation, in plain torch, of what the CUDA GEMM kernels do with the CUDA layouts:
the index arithmetic of csrc/cuda/qgemm.cu and qgemm_grad.cu (fragment words, dequantization order,
unstructured expansion, 2:4 metadata, the transposed tiles of grad_input, accumulator placement),
with mma.sync / mma.sp replaced by a matrix product over fragments rebuilt from the PTX ISA's
documented fragment layouts. Checked against x W^T and gy W on the CPU, so a mismatch between the
kernels' index math and the ISA's conventions shows up without a GPU. Likewise the key ranges, splits,
log-sum-exp merge and per-key backward of csrc/cuda/prefix_attention.cu against a concat-everything
reference."""
from __future__ import annotations

import math

import pytest
import torch

from ctp_fast import DenseWeight, Sparse24Weight, UnstructuredWeight
from ctp_fast.compress import nm_mask
from ctp_fast.formats.cuda_layout import to_cuda_layout

LANES = range(32)


# ------------------------------------------------------------------ the PTX ISA's fragments
def mma_16816(a, b0, b1, acc):
    """a[lane] = 8 values a0..a7, b0/b1[lane] = (b0, b1) / (b2, b3); acc[lane] = 4 values (updated)."""
    A, B = torch.zeros(16, 16, dtype=torch.float64), torch.zeros(16, 8, dtype=torch.float64)
    for lane in LANES:
        g, t = lane // 4, lane % 4
        for i in range(8):
            A[g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2)] = a[lane][i]
        for i, v in enumerate(b0[lane] + b1[lane]):
            B[2 * t + (i & 1) + 8 * (i >> 1), g] = v
    D = A @ B
    for lane in LANES:
        g, t = lane // 4, lane % 4
        for i in range(4):
            acc[lane][i] += D[g + 8 * (i >> 1), 2 * t + (i & 1)]


def mma_sp_16832(a, b, e, acc):
    """Sparse A (compressed a0..a7 per lane) with metadata e[lane] (selector 0), b[lane] = 8 values."""
    A, B = torch.zeros(16, 32, dtype=torch.float64), torch.zeros(32, 8, dtype=torch.float64)
    for lane in LANES:
        g, t = lane // 4, lane % 4
        for i in range(8):
            row, chunk, slot = g + 8 * ((i >> 1) & 1), t + 4 * (i >> 2), i & 1
            # metadata of (row, chunk): lane 4*(row%8) + chunk//4, bits[15:0] rows 0-7, bits[31:16] rows 8-15
            word = e[4 * (row % 8) + chunk // 4]
            nib = (word >> (16 * (row // 8) + 4 * (chunk % 4))) & 15
            A[row, 4 * chunk + ((nib >> (2 * slot)) & 3)] += a[lane][i]
        for i in range(8):
            B[2 * t + (i & 1) + 8 * (i >> 1), g] = b[lane][i]
    D = A @ B
    for lane in LANES:
        g, t = lane // 4, lane % 4
        for i in range(4):
            acc[lane][i] += D[g + 8 * (i >> 1), 2 * t + (i & 1)]


# ------------------------------------------------------------------ the kernels' lane arithmetic
def u32(t):
    return int(t) & 0xFFFFFFFF


def row_q(cw, grp, r0):
    scales, zeros = cw.scales.double(), cw.zeros
    z = lambda r: 8.0 if zeros is None else float(zeros[grp, r])  # noqa: E731
    return (z(r0), z(r0 + 8)), (float(scales[grp, r0]), float(scales[grp, r0 + 8]))


def dequant(word, q):
    """common.cuh dequant: register p = (nibble p, nibble p+4), rows g (p even) / g+8 (p odd)."""
    (z0, z8), (s0, s8) = q
    a = [0.0] * 8
    for p in range(4):
        lo, hi = (word >> (4 * p)) & 15, (word >> (16 + 4 * p)) & 15
        z, s = (z8, s8) if p & 1 else (z0, s0)
        a[2 * p], a[2 * p + 1] = (lo - z) * s, (hi - z) * s
    return a


def group_of(cw, k0):
    return min(k0 // cw.kernel_group_size, cw.ngroups - 1)


def zero_word(cw, grp, r0):
    if cw.zeros is None:
        return 0x88888888
    return int(cw.zeros[grp, r0]) * 0x01010101 | int(cw.zeros[grp, r0 + 8]) * 0x10101010


def expand_unstructured(cw, nt, c, nsteps):
    tile = nt * nsteps + c
    masks = [u32(cw.masks.view(-1, 32)[tile, lane]) for lane in LANES]
    start = int(cw.offsets[tile])
    stage = [u32(v) for v in cw.qweight[start: int(cw.offsets[tile + 1])]]
    out = []
    prefix = 0
    for lane in LANES:
        m = masks[lane]
        r0 = nt * 16 + lane // 4
        words = [zero_word(cw, group_of(cw, (c * 4 + j) * 16), r0) for j in range(4)]
        pos = prefix
        for b in range(32):
            if m >> b & 1:
                code = (stage[pos >> 3] >> (4 * (pos & 7))) & 15
                shift = 4 * (b & 7)
                words[b >> 3] = (words[b >> 3] & ~(15 << shift)) | (code << shift)
                pos += 1
        prefix += bin(m).count("1")
        out.append(words)
    return out


def fragment_words(cw, nt, c, nsteps):
    """The 4 words per lane of step c (dense / unstructured: 16-column k-tiles; 2:4: 32-column tiles)."""
    if cw.LAYOUT == "unstructured":
        return expand_unstructured(cw, nt, c, nsteps)
    q = cw.qweight.view(-1, 32, 4)[nt * nsteps + c]
    return [[u32(q[lane, j]) for j in range(4)] for lane in LANES]


def emulate_forward(cw, x):
    """qgemm_fwd_kernel for every 16-row tile and M-tile of 8, x [M, K] float64."""
    M, K, N = x.shape[0], cw.in_features, cw.out_features
    CK = 128 if cw.LAYOUT == "sparse24" else 64
    nsteps, ntiles = cw.padded_k // CK, cw.padded_n // 16
    perm = cw.perm
    y = torch.zeros(M, N, dtype=torch.float64)
    for m0 in range(0, M, 8):
        for nt in range(ntiles):
            acc = [[0.0] * 4 for _ in LANES]
            for c in range(nsteps):
                xs = torch.zeros(8, CK, dtype=torch.float64)
                for r in range(8):
                    for kk in range(CK):
                        k = c * CK + kk
                        if m0 + r < M and k < K:
                            xs[r, kk] = x[m0 + r, int(perm[k]) if perm is not None else k]
                words = fragment_words(cw, nt, c, nsteps)
                if cw.LAYOUT == "sparse24":
                    meta = cw.masks.view(-1, 16, 4)[nt * nsteps + c]
                    for j in range(4):
                        a = [dequant(words[lane][j], row_q(cw, group_of(cw, c * CK + j * 32), nt * 16 + lane // 4))
                             for lane in LANES]
                        b = [[float(xs[lane // 4, j * 32 + 2 * (lane % 4) + d + 8 * r]) for r in range(4) for d in (0, 1)]
                             for lane in LANES]
                        # lane l passes entry (l/4)*2 + (l&1)
                        e = [u32(meta[(lane // 4) * 2 + (lane & 1), j]) for lane in LANES]
                        mma_sp_16832(a, b, e, acc)
                else:
                    for j in range(4):
                        a = [dequant(words[lane][j], row_q(cw, group_of(cw, c * CK + j * 16), nt * 16 + lane // 4))
                             for lane in LANES]
                        b0 = [[float(xs[lane // 4, j * 16 + 2 * (lane % 4) + d]) for d in (0, 1)] for lane in LANES]
                        b1 = [[float(xs[lane // 4, j * 16 + 2 * (lane % 4) + 8 + d]) for d in (0, 1)] for lane in LANES]
                        mma_16816(a, b0, b1, acc)
            for lane in LANES:
                g, t = lane // 4, lane % 4
                for i in range(4):
                    n, m = nt * 16 + g + 8 * (i // 2), m0 + 2 * t + i % 2
                    if n < N and m < M:
                        y[m, n] += acc[lane][i]
    return y


def decode_tile(cw, nt, c):
    """qgemm_grad.cu decode_tile: W[16 rows of tile nt, columns c*64 .. +63] as wt[16][64]."""
    wt = torch.zeros(16, 64, dtype=torch.float64)
    if cw.LAYOUT == "sparse24":
        step, h, nsteps = c // 2, c % 2, cw.padded_k // 128
        tile = nt * nsteps + step
        q = cw.qweight.view(-1, 32, 4)[tile]
        meta = cw.masks.view(-1, 16, 4)[tile]
        for lane in LANES:
            g, t = lane // 4, lane % 4
            for jj in range(2):
                j = 2 * h + jj
                a = dequant(u32(q[lane, j]), row_q(cw, group_of(cw, step * 128 + j * 32), nt * 16 + g))
                for p in range(4):
                    row, chunk = g + 8 * (p & 1), t + 4 * (p >> 1)
                    e = u32(meta[g * 2 + (p >> 1), j])
                    nib = ((e >> 16) if p & 1 else (e & 0xFFFF)) >> (4 * t) & 15
                    wt[row, jj * 32 + chunk * 4 + (nib & 3)] = a[2 * p]
                    wt[row, jj * 32 + chunk * 4 + (nib >> 2)] = a[2 * p + 1]
        return wt
    nsteps = cw.padded_k // 64
    words = fragment_words(cw, nt, c, nsteps)
    for lane in LANES:
        g, t = lane // 4, lane % 4
        for j in range(4):
            a = dequant(words[lane][j], row_q(cw, group_of(cw, c * 64 + j * 16), nt * 16 + g))
            for p in range(4):
                col = j * 16 + 2 * t + 8 * (p >> 1)
                wt[g + 8 * (p & 1), col], wt[g + 8 * (p & 1), col + 1] = a[2 * p], a[2 * p + 1]
    return wt


def emulate_grad(cw, gy):
    M, N, K = gy.shape[0], cw.out_features, cw.in_features
    ntiles, bk = cw.padded_n // 16, -(-K // 64)
    perm = cw.perm
    gx = torch.zeros(M, K, dtype=torch.float64)
    for m0 in range(0, M, 8):
        for c in range(bk):
            acc = [[[0.0] * 4 for _ in LANES] for _ in range(4)]
            for nt in range(ntiles):
                wt = decode_tile(cw, nt, c)
                gs = torch.zeros(8, 16, dtype=torch.float64)
                for r in range(8):
                    for i in range(16):
                        n = nt * 16 + i
                        if m0 + r < M and n < N:
                            gs[r, i] = gy[m0 + r, n]
                for kt in range(4):
                    a = []
                    for lane in LANES:
                        g, t = lane // 4, lane % 4
                        vals = []
                        for p in range(4):
                            k, n = kt * 16 + g + 8 * (p & 1), 2 * t + 8 * (p >> 1)
                            vals += [float(wt[n, k]), float(wt[n + 1, k])]
                        a.append(vals)
                    b0 = [[float(gs[lane // 4, 2 * (lane % 4) + d]) for d in (0, 1)] for lane in LANES]
                    b1 = [[float(gs[lane // 4, 2 * (lane % 4) + 8 + d]) for d in (0, 1)] for lane in LANES]
                    mma_16816(a, b0, b1, acc[kt])
            for kt in range(4):
                for lane in LANES:
                    g, t = lane // 4, lane % 4
                    for i in range(4):
                        k, m = c * 64 + kt * 16 + g + 8 * (i // 2), m0 + 2 * t + i % 2
                        if k < K and m < M:
                            gx[m, int(perm[k]) if perm is not None else k] += acc[kt][lane][i]
    return gx


@pytest.mark.parametrize("fmt,n,k,g,sym,act", [
    (DenseWeight, 20, 80, 32, False, True),
    (DenseWeight, 16, 64, -1, True, False),
    (Sparse24Weight, 20, 136, 32, False, False),
    (Sparse24Weight, 16, 128, -1, True, False),
    (UnstructuredWeight, 20, 80, 32, False, True),
    (UnstructuredWeight, 17, 64, 64, True, False),
])
def test_emulated_kernels_match_the_reference(fmt, n, k, g, sym, act):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    mask = None
    if fmt is Sparse24Weight:
        mask = nm_mask(torch.rand(n, k, generator=gen), 2, 4) & (torch.rand(n, k, generator=gen) < 0.8)
    elif fmt is UnstructuredWeight:
        mask = torch.rand(n, k, generator=gen) < 0.4
    perm = torch.randperm(k, generator=gen) if act else None
    pw = fmt.pack(w, group_size=g, symmetric=sym, mask=mask, perm=perm)
    cw = to_cuda_layout(pw)
    W = pw.unpack(torch.float64)
    x = torch.randn(11, k, generator=gen, dtype=torch.float64)
    assert torch.allclose(emulate_forward(cw, x), x @ W.T, atol=1e-9, rtol=1e-9)
    gy = torch.randn(11, n, generator=gen, dtype=torch.float64)
    assert torch.allclose(emulate_grad(cw, gy), gy @ W, atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------------ prefix attention (prefix_attention.cu)
def own_range(S, L, causal, kv_start, b, i):
    lo = max(0, int(kv_start[b])) if kv_start is not None else 0
    hi = min(S, S - L + i + 1) if causal else S
    return lo, hi


def emulate_attention(q, k, v, kp, vp, kv_start, causal, scale, splits):
    """attn_fwd_kernel per (row, split) with its key ranges, then attn_merge_kernel."""
    B, H, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], kp.shape[1]
    per = max(-(-(P + S) // splits), 1)
    out, lse = torch.zeros(B, H, L, D, dtype=torch.float64), torch.zeros(B, H, L, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            for i in range(L):
                lo, hi = own_range(S, L, causal, kv_start, b, i)
                parts = []
                for s in range(splits):
                    t0, t1 = s * per, min(P + S, s * per + per)
                    keys = [(kp[hk, t], vp[hk, t]) for t in range(t0, min(t1, P))]
                    keys += [(k[b, hk, j], v[b, hk, j]) for j in range(max(t0 - P, lo), min(t1 - P, hi))]
                    m, l_, o = float("-inf"), 0.0, torch.zeros(D, dtype=torch.float64)
                    for kk, vv in keys:  # online softmax
                        sc = scale * float(q[b, h, i] @ kk)
                        m_new = max(m, sc)
                        corr, p = math.exp(m - m_new), math.exp(sc - m_new)
                        l_, o, m = l_ * corr + p, o * corr + p * vv, m_new
                    parts.append((o / l_ if l_ > 0 else o, m + math.log(l_) if l_ > 0 else float("-inf")))
                mx = max(p[1] for p in parts)
                wsum = sum(math.exp(p[1] - mx) for p in parts if p[1] != float("-inf"))
                out[b, h, i] = sum(math.exp(p[1] - mx) * p[0] for p in parts
                                   if p[1] != float("-inf")) / wsum
                lse[b, h, i] = mx + math.log(wsum)
    return out, lse


def emulate_attention_backward(go, q, k, v, kp, vp, out, lse, kv_start, causal, scale):
    """attn_dq_kernel per query row, attn_dkdv_kernel per key (prefix keys summed over the batch)."""
    B, H, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], kp.shape[1]
    G = H // Hkv
    delta = (go * out).sum(-1)
    dq = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            hk = h // G
            for i in range(L):
                lo, hi = own_range(S, L, causal, kv_start, b, i)
                keys = [(kp[hk, t], vp[hk, t]) for t in range(P)] + [(k[b, hk, j], v[b, hk, j]) for j in range(lo, hi)]
                for kk, vv in keys:
                    p = torch.exp(scale * (q[b, h, i] @ kk) - lse[b, h, i])
                    dq[b, h, i] += p * (go[b, h, i] @ vv - delta[b, h, i]) * kk
    dq *= scale
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dkp, dvp = torch.zeros_like(kp), torch.zeros_like(vp)
    for b in range(B):
        for hk in range(Hkv):
            for key in range(P + S):
                prefix, j = key < P, key - P
                kk, vv = (kp[hk, key], vp[hk, key]) if prefix else (k[b, hk, j], v[b, hk, j])
                i0 = 0
                if not prefix:
                    lo = max(0, int(kv_start[b])) if kv_start is not None else 0
                    i0 = L if j < lo else (max(0, j - (S - L)) if causal else 0)
                dkr, dvr = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
                for h in range(hk * G, (hk + 1) * G):
                    for i in range(i0, L):
                        p = torch.exp(scale * (q[b, h, i] @ kk) - lse[b, h, i])
                        dvr += p * go[b, h, i]
                        dkr += p * (go[b, h, i] @ vv - delta[b, h, i]) * q[b, h, i]
                if prefix:
                    dkp[hk, key] += scale * dkr
                    dvp[hk, key] += dvr
                else:
                    dk[b, hk, j], dv[b, hk, j] = scale * dkr, dvr
    return dq, dk, dv, dkp, dvp


def attention_reference(q, k, v, kp, vp, kv_start, causal, scale):
    B, H, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], kp.shape[1]
    keys = torch.cat([kp.unsqueeze(0).expand(B, -1, -1, -1), k], 2).repeat_interleave(H // Hkv, 1)
    vals = torch.cat([vp.unsqueeze(0).expand(B, -1, -1, -1), v], 2).repeat_interleave(H // Hkv, 1)
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    own = torch.ones(B, L, S, dtype=torch.bool)
    if causal:
        own = own & (j <= S - L + i)
    if kv_start is not None:
        own = own & (j[None] >= kv_start.view(B, 1, 1))
    allowed = torch.cat([torch.ones(B, L, P, dtype=torch.bool), own], 2)[:, None]
    s = (scale * q @ keys.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ vals, torch.logsumexp(s, -1)


@pytest.mark.parametrize("B,H,Hkv,L,S,P,causal,ks,splits", [
    (2, 4, 2, 5, 9, 3, True, [0, 2], 3),
    (1, 2, 1, 1, 12, 4, True, None, 4),   # decode, more splits than some ranges
    (2, 2, 2, 4, 4, 0, False, [1, 0], 2),  # no prompt
    (1, 3, 3, 6, 6, 2, True, None, 1),
])
def test_emulated_prefix_attention_matches_the_reference(B, H, Hkv, L, S, P, causal, ks, splits):
    gen = torch.Generator().manual_seed(0)
    D = 8
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, kp, vp = r(B, H, L, D), r(B, Hkv, S, D), r(B, Hkv, S, D), r(Hkv, P, D), r(Hkv, P, D)
    kv_start = None if ks is None else torch.tensor(ks)
    scale = 0.4
    out, lse = emulate_attention(q, k, v, kp, vp, kv_start, causal, scale, splits)
    ins = [t.clone().requires_grad_() for t in (q, k, v, kp, vp)]
    ref_out, ref_lse = attention_reference(*ins, kv_start, causal, scale)
    assert torch.allclose(out, ref_out, atol=1e-10) and torch.allclose(lse, ref_lse, atol=1e-10)
    go = r(B, H, L, D)
    ref_out.backward(go)
    grads = emulate_attention_backward(go, q, k, v, kp, vp, out, lse, kv_start, causal, scale)
    for got, t in zip(grads, ins):
        assert torch.allclose(got, t.grad, atol=1e-9)
