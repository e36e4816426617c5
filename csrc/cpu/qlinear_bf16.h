// bf16 activations at larger M (AVX512_BF16): the tiles of gemm_fwd_task / gemm_grad_task (qlinear_impl.h),
// dequantized by the same decoders but stored as bf16 pairs, and a micro-kernel of vdpbf16ps, which adds
// two bf16 products to each fp32 lane per instruction: twice the multiply-adds of the fp32 FMA kernel.
// A pair holds elements 2i (low half) and 2i + 1 (high half) of the reduction dimension: K forward, N for
// grad_input. The activations are copied once into rows of even length (zero padded, gathered through
// perm), so every pair read stays inside its row. Included only by qlinear_avx512bf16.cpp.
#pragma once
#include <immintrin.h>

#include "pair_bf16.h"

namespace ctp {
namespace CTP_ISA_NS {

typedef uint32_t Pair;

// Row splitting (split_rows): the bf16 product is twice as fast as the fp32 one, so W's dequantization,
// repeated per row chunk, weighs twice as much; fewer tasks than the fp32 kernels' 16, but two row chunks
// (Intel Xeon VM, 2 threads, SmolLM2 shapes at M = 100 and 256: 1.0-1.35x faster than 16 tasks, 1.05-1.5x
// faster than one chunk; benchmarks/results/bench_bf16.md).
constexpr int64_t BF16_TASKS = 8, BF16_MIN_CHUNKS = 2;

// Panel-major pair tile: pair row p, column j at (j / NR) * panel_stride + p * NR + j % NR.
static inline Pair* pair_at(Pair* buf, int64_t panel_stride, int64_t p, int64_t j) {
  return buf + (j / NR) * panel_stride + p * NR + j % NR;
}

// C[r][j] (+)= sum_p A[r][2p] B[p][j].lo + A[r][2p+1] B[p][j].hi, fp32 accumulation (see micro).
template <int MRT>
static void micro_bf16(const uint16_t* A, int64_t lda, const Pair* B, int64_t pairs, float* Cm, int64_t ldc,
                       int64_t ncols, bool first, const float* bias) {
  F acc[MRT][V::NRV];
  load_acc<MRT>(acc, Cm, ldc, ncols, first, bias);
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[V::NRV];
    for (int j = 0; j < V::NRV; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(B + p * NR + j * W);
    for (int r = 0; r < MRT; ++r) {
      Pair a;
      std::memcpy(&a, A + r * lda + 2 * p, sizeof a);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(a));
      for (int j = 0; j < V::NRV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
    }
  }
  store_acc<MRT>(acc, Cm, ldc, ncols);
}

template <int R>
static void micro_bf16_rows(int mr, const uint16_t* A, int64_t lda, const Pair* B, int64_t pairs, float* Cm,
                            int64_t ldc, int64_t ncols, bool first, const float* bias) {
  if (mr == R) return micro_bf16<R>(A, lda, B, pairs, Cm, ldc, ncols, first, bias);
  if constexpr (R > 1) micro_bf16_rows<R - 1>(mr, A, lda, B, pairs, Cm, ldc, ncols, first, bias);
}

static void tile_product_bf16(const uint16_t* A, int64_t lda, int64_t m0, int64_t m1, const Pair* B,
                              int64_t panel_stride, int64_t pairs, float* Cm, int64_t ldc, int64_t ncols,
                              bool first, const float* bias) {
  for (int64_t m = m0; m < m1; m += V::MR) {
    const int mr = int(imin(V::MR, m1 - m));
    for (int64_t j = 0; j < ncols; j += NR)
      micro_bf16_rows<V::MR>(mr, A + m * lda, lda, B + (j / NR) * panel_stride, pairs, Cm + m * ldc + j, ldc,
                             imin(NR, ncols - j), first, bias ? bias + j : nullptr);
  }
}

struct GemmCtx16 {
  const QView* w;
  const uint16_t* a;  // forward: x [M][lda]; grad_input: gy [M][lda]; lda even
  int64_t lda;
  const float* bias;
  float* out;         // forward: y [M][N]; grad_input: gx [M][K]
  int64_t M, mchunk, mtasks;
};

// Forward tile: pair row (k - k0) / 2, column bi * 32 + lane; an odd K's last pair has 0 in its high half.
template <class Dec>
static void dequant_tile_bf16(const QView& w, int64_t b0, int64_t nbc, int64_t k0, int64_t kc, Pair* buf) {
  for (int64_t bi = 0; bi < nbc; ++bi) {
    Dec dec;
    dec.begin(w, b0 + bi, k0);
    for (int64_t k = k0; k < k0 + kc; k += 2) {
      F lo[NV], hi[NV];
      dec.next(w, lo);
      if (k + 1 < k0 + kc) dec.next(w, hi);
      else
        for (int v = 0; v < NV; ++v) hi[v] = V::zero();
      for (int v = 0; v < NV; ++v)
        _mm512_storeu_si512(pair_at(buf, KC / 2 * NR, (k - k0) / 2, bi * 32 + v * W), pair_bf16(lo[v], hi[v]));
    }
    dec.end(w);
  }
}

template <class Dec>
static void gemm_fwd_bf16_task(void* p, int64_t begin, int64_t end) {
  const GemmCtx16& c = *static_cast<const GemmCtx16*>(p);
  const QView& w = *c.w;
  const int64_t N = w.N, K = w.K;
  Pair* buf = static_cast<Pair*>(alloc_zeroed(KC / 2 * FWD_BLOCKS * 32 * sizeof(Pair)));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b0 = (t / c.mtasks) * FWD_BLOCKS, nbc = imin(FWD_BLOCKS, w.nblocks() - b0);
    const int64_t n0 = b0 * 32, ncols = imin(N - n0, nbc * 32);
    const int64_t m0 = (t % c.mtasks) * c.mchunk, m1 = imin(c.M, m0 + c.mchunk);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {  // KC is even: pairs never straddle tiles
      const int64_t kc = imin(KC, K - k0);
      dequant_tile_bf16<Dec>(w, b0, nbc, k0, kc, buf);
      tile_product_bf16(c.a + k0, c.lda, m0, m1, buf, KC / 2 * NR, (kc + 1) / 2, c.out + n0, N, ncols, k0 == 0,
                        c.bias ? c.bias + n0 : nullptr);
    }
  }
  std::free(buf);
}

// grad_input tile: pair row (n - n0) / 2, column k - k0 (n0 and block starts are even). A block's odd
// last row (N odd) pairs with 0.
template <class Dec>
static void dequant_tile_t_bf16(const QView& w, int64_t n0, int64_t nc, int64_t k0, int64_t kt, Pair* bufT) {
  alignas(64) uint16_t tmp[34];
  for (int64_t b = n0 / 32; b * 32 < n0 + nc; ++b) {
    const int64_t lanes = imin(32, n0 + nc - b * 32), npairs = (lanes + 1) / 2;
    Dec dec;
    dec.begin(w, b, k0);
    for (int64_t k = k0; k < k0 + kt; ++k) {
      F val[NV];
      dec.next(w, val);
      for (int v = 0; v < NV; ++v) _mm256_store_si256((__m256i*)(tmp + v * W), (__m256i)_mm512_cvtneps_pbh(val[v]));
      tmp[lanes] = 0;  // lanes < 32: the partner of an odd last row; lanes == 32: unused
      Pair* col = pair_at(bufT, NCT / 2 * NR, (b * 32 - n0) / 2, k - k0);
      for (int64_t i = 0; i < npairs; ++i) std::memcpy(col + i * NR, tmp + 2 * i, sizeof(Pair));
    }
    dec.end(w);
  }
}

template <class Dec>
static void gemm_grad_bf16_task(void* p, int64_t begin, int64_t end) {
  const GemmCtx16& c = *static_cast<const GemmCtx16*>(p);
  const QView& w = *c.w;
  const int64_t N = w.N, K = w.K;
  Pair* bufT = static_cast<Pair*>(alloc_zeroed(NCT / 2 * KT * sizeof(Pair)));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t k0 = (t / c.mtasks) * KT, kt = imin(KT, K - k0);
    const int64_t m0 = (t % c.mtasks) * c.mchunk, m1 = imin(c.M, m0 + c.mchunk);
    for (int64_t n0 = 0; n0 < N; n0 += NCT) {  // NCT is a multiple of 32
      const int64_t nc = imin(NCT, N - n0);
      dequant_tile_t_bf16<Dec>(w, n0, nc, k0, kt, bufT);
      tile_product_bf16(c.a + n0, c.lda, m0, m1, bufT, NCT / 2 * NR, (nc + 1) / 2, c.out + k0, K, kt, n0 == 0,
                        nullptr);
    }
  }
  std::free(bufT);
}

template <class Dec> struct FwdBf16Task { static constexpr TaskFn fn = gemm_fwd_bf16_task<Dec>; };
template <class Dec> struct GradBf16Task { static constexpr TaskFn fn = gemm_grad_bf16_task<Dec>; };

// x [M][L] -> rows of even length (zero padded), columns gathered through perm when given; *ld = row length.
static uint16_t* even_rows(const uint16_t* x, int64_t M, int64_t L, const int64_t* perm, int64_t* ld) {
  const int64_t E = (L + 1) / 2 * 2;
  uint16_t* out = static_cast<uint16_t*>(alloc_zeroed(size_t(M * E) * sizeof(uint16_t)));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < L; ++i) out[m * E + i] = x[m * L + (perm ? perm[i] : i)];
  *ld = E;
  return out;
}

void linear_bf16(const QView& w, const uint16_t* x, int64_t M, const float* bias, float* y, ParallelFn par) {
  GemmCtx16 c{&w, nullptr, 0, bias, y, M, M, 1};
  uint16_t* xe = even_rows(x, M, w.K, w.perm, &c.lda);
  c.a = xe;
  const int64_t col_tasks = cdiv(w.nblocks(), FWD_BLOCKS);
  split_rows(c, col_tasks, BF16_TASKS, BF16_MIN_CHUNKS);
  par(col_tasks * c.mtasks, &c, pick<FwdBf16Task>(w));
  std::free(xe);
}

void linear_grad_input_bf16(const QView& w, const uint16_t* gy, int64_t M, float* gx, ParallelFn par) {
  float* gxp = w.perm ? alloc_floats(M * w.K) : gx;
  GemmCtx16 c{&w, nullptr, 0, nullptr, gxp, M, M, 1};
  uint16_t* ge = even_rows(gy, M, w.N, nullptr, &c.lda);
  c.a = ge;
  const int64_t col_tasks = cdiv(w.K, KT);
  split_rows(c, col_tasks, BF16_TASKS, BF16_MIN_CHUNKS);
  par(col_tasks * c.mtasks, &c, pick<GradBf16Task>(w));
  std::free(ge);
  scatter_perm(w, gxp, M, gx);
}

}  // namespace CTP_ISA_NS
}  // namespace ctp
