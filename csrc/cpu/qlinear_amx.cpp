// The packed-weight GEMMs on Intel AMX (tile registers, TDPBF16PS), for fp32 and bf16 activations at
// M >= AMX_MIN_M. Compiled for that target whatever the build flags; run only when the CPU reports AMX
// and the OS grants the tile state (qlinear_dispatch.cpp). The decoders come from qlinear_impl.h.
//
// Exact with respect to the stored weight, as the fp32 kernels are:
//  * W is decoded with unit scales, so the tiles hold code - zero: small integers, exact in bf16. The
//    scales are applied in fp32: per group on the accumulated tile (forward), or, for grad_input with one
//    group, folded into the fp32 grad_y before it is split (there the scale's row n is the reduction index).
//  * grad_input with several groups decodes W with its scales and splits it into hi + lo bf16 halves
//    (exact for 3- and 4-bit codes with fp16 / bf16 scales: at most 4 + 11 significant bits), then takes
//    all four products of the halves of grad_y and W (two for bf16 grad_y), so the error stays that of
//    the grad_y split alone. Folding each group's scales into grad_y instead (as for one group) would
//    re-split all of grad_y once per group: at group 64 that cost more than the products
//    (4096 x 4096, M = 512: 45.6 ms against 29.9 ms this way).
//  * fp32 activations are split into hi + lo bf16 halves (hi = bf16(a), lo = bf16(a - hi)): each product
//    is then accurate to ~2^-17 relative, under the fp32 kernels' test tolerance. When every lo is zero
//    (bf16 activations, widened by the caller) the lo products are skipped.
//  * Products accumulate in fp32 inside the tiles.
// Tiles: 0 = A hi, 1 = A lo (the forward; grad_input loads both halves into 0 in turn), 2, 3 = B (two
// 16-column halves), 4, 5 = C (the same halves), 6, 7 = B lo (grad_input with several groups); all 16 x 64 bytes.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c,bmi2,popcnt")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "simd_avx512.h"
using V = VecAvx512;
#define CTP_ISA_NS amx
#define CTP_BF16_GEMM  // leaves out qlinear_impl.h's fp32 entry points: this file has its own
#include "qlinear_impl.h"
#include "pair_bf16.h"  // exact here: the decoded values are small integers

namespace ctp {
namespace amx {

static void tile_config() {
  alignas(64) uint8_t cfg[64] = {0};
  cfg[0] = 1;  // palette 1
  for (int t = 0; t < 8; ++t) {
    cfg[16 + 2 * t] = 64;  // bytes per row
    cfg[48 + t] = 16;      // rows
  }
  _tile_loadconfig(cfg);
}

// 16 fp32 values -> hi and lo bf16 halves (round to nearest even both); returns whether any lo is nonzero.
static inline bool split_bf16(__m512 v, uint16_t* hi, uint16_t* lo) {
  const __m256bh h = _mm512_cvtneps_pbh(v);
  const __m512 r = _mm512_sub_ps(v, _mm512_cvtpbh_ps(h));
  const __m256bh l = _mm512_cvtneps_pbh(r);
  _mm256_storeu_si256((__m256i*)hi, (__m256i)h);
  _mm256_storeu_si256((__m256i*)lo, (__m256i)l);
  return _mm512_cmpneq_ps_mask(r, _mm512_setzero_ps()) != 0;
}

// Splits rows [0, M) of a (row m at a + m * lda, column j at col ? col[j] : j, j < n) into hi / lo
// [rows][ld] bf16 (the padding stays zero), each row multiplied by mul (optional, [n]).
static bool split_rows_bf16(const float* a, int64_t lda, const int64_t* col, int64_t M, int64_t n, const float* mul,
                            int64_t ld, uint16_t* hi, uint16_t* lo) {
  bool any_lo = false;
  float* row = col ? alloc_floats(ld) : nullptr;
  for (int64_t m = 0; m < M; ++m) {
    const float* src = a + m * lda;
    if (col) {  // act-order: gather (padding past n stays zero)
      for (int64_t j = 0; j < n; ++j) row[j] = src[col[j]];
      src = row;
    }
    for (int64_t j = 0; j < ld; j += 16) {
      const __mmask16 in = j + 16 <= n ? __mmask16(0xFFFF) : j < n ? __mmask16((1u << (n - j)) - 1) : __mmask16(0);
      __m512 v = _mm512_maskz_loadu_ps(in, src + j);
      if (mul) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(in, mul + j));
      any_lo |= split_bf16(v, hi + m * ld + j, lo + m * ld + j);
    }
  }
  std::free(row);
  return any_lo;
}

// Scale idx of the stored weight ([blocks][G][32]) as fp32.
static inline float scale_at(const QView& w, int64_t idx) {
  switch (w.scale_type) {
    case ScaleType::f32: return static_cast<const float*>(w.scales)[idx];
    case ScaleType::f16: return _cvtsh_ss(static_cast<const uint16_t*>(w.scales)[idx]);
    default: {
      const uint32_t bits = uint32_t(static_cast<const uint16_t*>(w.scales)[idx]) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
  }
}

struct AmxCtx {
  const QView* w;   // the stored weight (its scales)
  const QView* wu;  // what the decoders read: the codes with unit fp32 scales (they yield code - zero), or
                    // for grad_input with several groups w itself
  const uint16_t *ah, *al;  // the A operand split: x [Mp][Kp] (forward), grad_y [Mp][Np] (grad_input)
  bool lo;
  int64_t M, Mp, Kp, Np;
  const float* bias;
  float* out;  // y [M][N] or gx [M][K] (packed column order)
};

// ---------------------------------------------------------------- forward
// Block b's W^T as B tiles: panel[(t * 2 + h) * 256 + r * 16 + j] = pair (k = 32t + 2r, +1) of row 32b + 16h + j.
template <class Dec>
static void fwd_panel(const QView& wu, int64_t b, int64_t Kp, uint32_t* panel) {
  Dec dec;
  dec.begin(wu, b, 0);
  const __m512 z = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 2) {
    __m512 c0[2] = {z, z}, c1[2] = {z, z};
    if (k < wu.K) dec.next(wu, c0);
    if (k + 1 < wu.K) dec.next(wu, c1);
    const int64_t t = k / 32, r = (k % 32) / 2;
    for (int h = 0; h < 2; ++h) _mm512_store_si512(panel + (t * 2 + h) * 256 + r * 16, pair_bf16(c0[h], c1[h]));
  }
  dec.end(wu);
}

template <class Dec>
static void fwd_task(void* p, int64_t begin, int64_t end) {
  const AmxCtx& c = *static_cast<const AmxCtx*>(p);
  const QView& w = *c.w;
  const int64_t G = w.ngroups(), steps = c.Kp / 32, lda = c.Kp * 2;
  uint32_t* panel = static_cast<uint32_t*>(alloc_zeroed(size_t(steps) * 512 * 4));
  float* sb = alloc_floats(G * 32);
  alignas(64) float tmp[16 * 32], acc[16 * 32];
  tile_config();
  for (int64_t b = begin; b < end; ++b) {
    fwd_panel<Dec>(*c.wu, b, c.Kp, panel);
    for (int64_t j = 0; j < G * 32; ++j) sb[j] = scale_at(w, b * G * 32 + j);
    const int64_t ncols = imin(32, w.N - b * 32);
    for (int64_t m0 = 0; m0 < c.Mp; m0 += 16) {
      for (int i = 0; i < 16 * 32; i += 16) _mm512_store_ps(acc + i, _mm512_setzero_ps());
      for (int64_t g = 0; g < G; ++g) {
        const int64_t t0 = g * w.group_size / 32, t1 = g == G - 1 ? steps : (g + 1) * w.group_size / 32;
        _tile_zero(4);
        _tile_zero(5);
        for (int64_t t = t0; t < t1; ++t) {
          _tile_loadd(0, c.ah + m0 * c.Kp + t * 32, lda);
          _tile_loadd(2, panel + t * 512, 64);
          _tile_loadd(3, panel + t * 512 + 256, 64);
          _tile_dpbf16ps(4, 0, 2);
          _tile_dpbf16ps(5, 0, 3);
          if (c.lo) {
            _tile_loadd(1, c.al + m0 * c.Kp + t * 32, lda);
            _tile_dpbf16ps(4, 1, 2);
            _tile_dpbf16ps(5, 1, 3);
          }
        }
        _tile_stored(4, tmp, 128);
        _tile_stored(5, tmp + 16, 128);
        const __m512 s0 = _mm512_loadu_ps(sb + g * 32), s1 = _mm512_loadu_ps(sb + g * 32 + 16);
        for (int r = 0; r < 16; ++r) {
          float* ar = acc + r * 32;
          _mm512_store_ps(ar, _mm512_fmadd_ps(_mm512_load_ps(tmp + r * 32), s0, _mm512_load_ps(ar)));
          _mm512_store_ps(ar + 16, _mm512_fmadd_ps(_mm512_load_ps(tmp + r * 32 + 16), s1, _mm512_load_ps(ar + 16)));
        }
      }
      for (int64_t r = 0; r < 16 && m0 + r < c.M; ++r) {
        float* yr = c.out + (m0 + r) * w.N + b * 32;
        for (int64_t j = 0; j < ncols; ++j) yr[j] = acc[r * 32 + j] + (c.bias ? c.bias[b * 32 + j] : 0.f);
      }
    }
  }
  _tile_release();
  std::free(panel);
  std::free(sb);
}

// ---------------------------------------------------------------- grad_input
// 16 x 16 transpose of 32-bit lanes: out row i = lane i of rows 0..15.
static inline void transpose16(const __m512i* r, uint32_t* out) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // u[4i + j], 128-bit lane L: column 4L + j of rows 4i..4i+3.
  for (int j = 0; j < 4; ++j) {
    const __m512i v = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), v2 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i x = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44), x2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
    _mm512_store_si512(out + (0 + j) * 16, _mm512_shuffle_i32x4(v, x, 0x88));
    _mm512_store_si512(out + (4 + j) * 16, _mm512_shuffle_i32x4(v, x, 0xDD));
    _mm512_store_si512(out + (8 + j) * 16, _mm512_shuffle_i32x4(v2, x2, 0x88));
    _mm512_store_si512(out + (12 + j) * 16, _mm512_shuffle_i32x4(v2, x2, 0xDD));
  }
}

// Columns k0..k0+31 of W as B tiles: panel[(b * 2 + h) * 256 + r * 16 + j] = pair (rows 32b + 2r, +1) of
// column k0 + 16h + j. SPLIT: hi / lo bf16 halves of the decoded values (lo into panel_lo), else the values
// are exact in bf16 (unit scales).
template <class Dec, bool SPLIT>
static void grad_panel(const QView& wv, int64_t k0, uint32_t* panel, uint32_t* panel_lo) {
  alignas(64) __m512i cols[32], cols_lo[SPLIT ? 32 : 1];  // lane r: pair (rows 2r, 2r + 1) of column k0 + kk
  const __m512 z = _mm512_setzero_ps();
  for (int64_t b = 0; b < wv.nblocks(); ++b) {
    Dec dec;
    dec.begin(wv, b, k0);
    for (int kk = 0; kk < 32; ++kk) {
      __m512 col[2] = {z, z};
      if (k0 + kk < wv.K) dec.next(wv, col);
      const __m512bh hi = _mm512_cvtne2ps_pbh(col[1], col[0]);  // words 0..15: rows 0..15, 16..31: rows 16..31
      cols[kk] = (__m512i)hi;
      if constexpr (SPLIT) {
        const __m512i h = (__m512i)hi;
        const __m512 h0 = _mm512_cvtpbh_ps((__m256bh)_mm512_castsi512_si256(h));
        const __m512 h1 = _mm512_cvtpbh_ps((__m256bh)_mm512_extracti64x4_epi64(h, 1));
        cols_lo[kk] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(col[1], h1), _mm512_sub_ps(col[0], h0));
      }
    }
    dec.end(wv);
    for (int h = 0; h < 2; ++h) {
      transpose16(cols + 16 * h, panel + (b * 2 + h) * 256);
      if constexpr (SPLIT) transpose16(cols_lo + 16 * h, panel_lo + (b * 2 + h) * 256);
    }
  }
}

// Tasks are 32-column chunks of K; the caller split grad_y (c.ah, c.al): times the scales with one group,
// W then decoding exactly with unit scales (c.wu); as it is with several (SPLIT), W decoding with its scales
// into hi / lo B tiles.
template <class Dec, bool SPLIT>
static void grad_task(void* p, int64_t begin, int64_t end) {
  const AmxCtx& c = *static_cast<const AmxCtx*>(p);
  const QView& w = *c.w;
  const int64_t nb = w.nblocks(), lda = c.Np * 2;
  uint32_t* panel = static_cast<uint32_t*>(alloc_zeroed(size_t(nb) * 512 * 4 * (SPLIT ? 2 : 1)));
  uint32_t* panel_lo = SPLIT ? panel + nb * 512 : nullptr;
  alignas(64) float tmp[16 * 32];
  tile_config();
  for (int64_t ch = begin; ch < end; ++ch) {
    const int64_t k0 = ch * 32;
    grad_panel<Dec, SPLIT>(*c.wu, k0, panel, panel_lo);
    const int64_t ncols = imin(32, w.K - k0);
    for (int64_t m0 = 0; m0 < c.Mp; m0 += 16) {
      _tile_zero(4);
      _tile_zero(5);
      for (int64_t b = 0; b < nb; ++b) {
        _tile_loadd(2, panel + b * 512, 64);
        _tile_loadd(3, panel + b * 512 + 256, 64);
        if (SPLIT) {
          _tile_loadd(6, panel_lo + b * 512, 64);
          _tile_loadd(7, panel_lo + b * 512 + 256, 64);
        }
        for (int a = 0; a < (c.lo ? 2 : 1); ++a) {  // A hi, then A lo
          _tile_loadd(0, (a ? c.al : c.ah) + m0 * c.Np + b * 32, lda);
          _tile_dpbf16ps(4, 0, 2);
          _tile_dpbf16ps(5, 0, 3);
          if (SPLIT) {
            _tile_dpbf16ps(4, 0, 6);
            _tile_dpbf16ps(5, 0, 7);
          }
        }
      }
      _tile_stored(4, tmp, 128);
      _tile_stored(5, tmp + 16, 128);
      for (int64_t r = 0; r < 16 && m0 + r < c.M; ++r)
        std::memcpy(c.out + (m0 + r) * w.K + k0, tmp + r * 32, size_t(ncols) * 4);
    }
  }
  _tile_release();
  std::free(panel);
}

template <class Dec> struct AmxFwd { static constexpr TaskFn fn = fwd_task<Dec>; };
template <class Dec> struct AmxGrad { static constexpr TaskFn fn = grad_task<Dec, false>; };
template <class Dec> struct AmxGradSplit { static constexpr TaskFn fn = grad_task<Dec, true>; };

// The task for w's layout, decoding with unit fp32 scales (wu).
template <template <class> class Task>
static TaskFn pick_unit(const QView& w) {
  return w.zeros ? pick_layout<Task, ScaleType::f32, true>(w) : pick_layout<Task, ScaleType::f32, false>(w);
}

// w with unit fp32 scales (caller frees *ones).
static QView unit_view(const QView& w, float** ones) {
  const int64_t n = w.nblocks() * w.ngroups() * 32;
  *ones = alloc_floats(n);
  for (int64_t i = 0; i < n; ++i) (*ones)[i] = 1.f;
  QView wu = w;
  wu.scales = *ones;
  wu.scale_type = ScaleType::f32;
  return wu;
}

bool usable(const QView& w, int64_t M) {
  return M >= AMX_MIN_M && (w.group_size % 32 == 0 || w.ngroups() == 1);
}

void linear(const QView& w, const float* x, int64_t M, const float* bias, float* y, ParallelFn par) {
  const int64_t Mp = cdiv(M, 16) * 16, Kp = cdiv(w.K, 32) * 32;
  uint16_t* xh = static_cast<uint16_t*>(alloc_zeroed(size_t(Mp) * Kp * 2));
  uint16_t* xl = static_cast<uint16_t*>(alloc_zeroed(size_t(Mp) * Kp * 2));
  const bool lo = split_rows_bf16(x, w.K, w.perm, M, w.K, nullptr, Kp, xh, xl);
  float* ones;
  const QView wu = unit_view(w, &ones);
  AmxCtx c{&w, &wu, xh, xl, lo, M, Mp, Kp, 0, bias, y};
  par(w.nblocks(), &c, pick_unit<AmxFwd>(w));
  std::free(xh);
  std::free(xl);
  std::free(ones);
}

void linear_grad_input(const QView& w, const float* gy, int64_t M, float* gx, ParallelFn par) {
  float* gxp = w.perm ? alloc_floats(M * w.K) : gx;
  const int64_t Mp = cdiv(M, 16) * 16, Np = w.nblocks() * 32;
  const bool split_w = w.ngroups() > 1;
  float* sg = nullptr;  // one group: grad_y times the scales (index n of [blocks][1][32])
  if (!split_w) {
    sg = alloc_floats(w.N);
    for (int64_t n = 0; n < w.N; ++n) sg[n] = scale_at(w, n);
  }
  uint16_t* gh = static_cast<uint16_t*>(alloc_zeroed(size_t(Mp) * Np * 2));
  uint16_t* gl = static_cast<uint16_t*>(alloc_zeroed(size_t(Mp) * Np * 2));
  const bool lo = split_rows_bf16(gy, w.N, nullptr, M, w.N, sg, Np, gh, gl);
  float* ones = nullptr;
  const QView wu = split_w ? w : unit_view(w, &ones);
  AmxCtx c{&w, &wu, gh, gl, lo, M, Mp, 0, Np, nullptr, gxp};
  par(w.nchunks(), &c, split_w ? pick<AmxGradSplit>(w) : pick_unit<AmxGrad>(w));
  std::free(sg);
  std::free(gh);
  std::free(gl);
  std::free(ones);
  scatter_perm(w, gxp, M, gx);
}

}  // namespace amx
}  // namespace ctp
