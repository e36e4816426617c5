// The int4 kernels, written once over a SIMD wrapper V (simd_*.h) and compiled once per
// instruction set: int4_<isa>.cpp defines CTP_ISA_NS and V, then includes this file. Each
// compilation lives in its own namespace, so no symbol built for one target is shared.
// No std:: templates here: a weak instantiation built for AVX-512 could be picked by the linker
// for the scalar path.
//
// Two strategies:
//  * small M (gemv_*): one pass over the packed weight, one lane per output row, codes widened
//    in registers; per group, sum(q * x) is scaled once: y += s * (sum(q x) - z * sum(x)).
//  * larger M (gemm_*): a cache-sized tile of W is dequantized to fp32 (KC x 128 forward,
//    NCT x KT transposed for grad_input) and fed to a register-blocked FMA micro-kernel.
#include <cstdlib>
#include <cstring>

#include "int4_kernels.h"

namespace ctp {
namespace CTP_ISA_NS {

using F = typename V::F;
using I = typename V::I;
constexpr int W = V::W;
constexpr int C = 16 / W;       // byte chunks per 16-byte column of a block
constexpr int NV = 2 * C;       // vectors covering the 32 rows of a block; vector v = rows v*W..
constexpr int NR = V::NRV * W;  // micro-kernel columns
constexpr int64_t GEMV_MAX_M = 4;
constexpr int64_t KC = 256;       // forward tile depth (along K)
constexpr int64_t FWD_BLOCKS = 4; // forward tile width in 32-row blocks
constexpr int64_t NCT = 256;      // grad_input tile depth (along N)
constexpr int64_t KT = 128;       // grad_input tile width (along K)

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

static float* alloc_floats(int64_t n) {
  size_t bytes = (size_t(n) * sizeof(float) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes ? bytes : 64);
  if (p) std::memset(p, 0, bytes);
  return static_cast<float*>(p);
}

template <ScaleType ST>
static inline F load_scale(const void* base, int64_t idx) {
  if constexpr (ST == ScaleType::f32) return V::load(static_cast<const float*>(base) + idx);
  else if constexpr (ST == ScaleType::f16) return V::load_f16(static_cast<const uint16_t*>(base) + idx);
  else return V::load_bf16(static_cast<const uint16_t*>(base) + idx);
}

// Codes of the 32 rows of a block at one column, as floats.
static inline void decode(const uint8_t* p, F* d) {
  for (int c = 0; c < C; ++c) {
    I iv = V::load_u8(p + c * W);
    d[c] = V::low_nibble(iv);
    d[C + c] = V::high_nibble(iv);
  }
}

template <ScaleType ST, bool ASYM>
static inline void load_group(const Int4View& w, int64_t b, int64_t g, F* s, F* z) {
  int64_t base = (b * w.ngroups() + g) * 32;
  for (int v = 0; v < NV; ++v) {
    s[v] = load_scale<ST>(w.scales, base + v * W);
    z[v] = ASYM ? V::load_u8_float(w.zeros + base + v * W) : V::bcast(8.f);
  }
}

// Writes the 32 lanes of a block row to out[n], n < N only, adding bias.
static inline void store_block(const F* acc, int64_t n0, int64_t N, const float* bias, float* out) {
  alignas(64) float tmp[32];
  for (int v = 0; v < NV; ++v) V::store(tmp + v * W, acc[v]);
  int64_t cnt = imin(32, N - n0);
  for (int64_t j = 0; j < cnt; ++j) out[n0 + j] = tmp[j] + (bias ? bias[n0 + j] : 0.f);
}

// ---------------------------------------------------------------- small M: one pass over W
template <int MRT, ScaleType ST, bool ASYM>
static void gemv_block(const Int4View& w, int64_t b, const float* x, const float* xsum, int64_t m0,
                       const float* bias, float* y) {
  // Independent accumulator sets so that FMA latency is hidden when MRT * NV is small.
  constexpr int KU = (NV * MRT >= 8) ? 1 : 8 / (NV * MRT);
  const int64_t K = w.K, G = w.ngroups(), gs = w.group_size;
  const uint8_t* qb = w.qweight + b * K * 16;
  F yacc[MRT][NV];
  for (int r = 0; r < MRT; ++r)
    for (int v = 0; v < NV; ++v) yacc[r][v] = V::zero();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * gs, k1 = imin(K, k0 + gs);
    F acc[KU][MRT][NV];
    for (int u = 0; u < KU; ++u)
      for (int r = 0; r < MRT; ++r)
        for (int v = 0; v < NV; ++v) acc[u][r][v] = V::zero();
    int64_t k = k0;
    for (; k + KU <= k1; k += KU) {
      for (int u = 0; u < KU; ++u) {
        F d[NV];
        decode(qb + (k + u) * 16, d);
        for (int r = 0; r < MRT; ++r) {
          F xb = V::bcast(x[(m0 + r) * K + k + u]);
          for (int v = 0; v < NV; ++v) acc[u][r][v] = V::fma(d[v], xb, acc[u][r][v]);
        }
      }
    }
    for (; k < k1; ++k) {
      F d[NV];
      decode(qb + k * 16, d);
      for (int r = 0; r < MRT; ++r) {
        F xb = V::bcast(x[(m0 + r) * K + k]);
        for (int v = 0; v < NV; ++v) acc[0][r][v] = V::fma(d[v], xb, acc[0][r][v]);
      }
    }
    F s[NV], z[NV];
    load_group<ST, ASYM>(w, b, g, s, z);
    for (int r = 0; r < MRT; ++r) {
      F xs = V::bcast(xsum[(m0 + r) * G + g]);
      for (int v = 0; v < NV; ++v) {
        F a = acc[0][r][v];
        for (int u = 1; u < KU; ++u) a = V::add(a, acc[u][r][v]);
        yacc[r][v] = V::fma(s[v], V::sub(a, V::mul(z[v], xs)), yacc[r][v]);
      }
    }
  }
  for (int r = 0; r < MRT; ++r) store_block(yacc[r], b * 32, w.N, bias, y + (m0 + r) * w.N);
}

struct GemvCtx {
  const Int4View* w;
  const float* x;
  const float* xsum;
  const float* bias;
  float* y;
  int64_t M;
};

template <ScaleType ST, bool ASYM>
static void gemv_task(void* p, int64_t begin, int64_t end) {
  const GemvCtx& c = *static_cast<const GemvCtx*>(p);
  constexpr int MR = V::GEMV_MR;
  for (int64_t b = begin; b < end; ++b) {
    int64_t m = 0;
    for (; m + MR <= c.M; m += MR) gemv_block<MR, ST, ASYM>(*c.w, b, c.x, c.xsum, m, c.bias, c.y);
    for (; m < c.M; ++m) gemv_block<1, ST, ASYM>(*c.w, b, c.x, c.xsum, m, c.bias, c.y);
  }
}

// ---------------------------------------------------------------- micro-kernel
// C[r][j] (+)= sum_p A[r * lda + p] * B[p * ldb + j] for r < MRT, j < ncols (<= NR).
// first: start from bias (or zero) instead of C.
template <int MRT>
static void micro(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t depth, float* Cm,
                  int64_t ldc, int64_t ncols, bool first, const float* bias) {
  F acc[MRT][V::NRV];
  alignas(64) float tmp[NR];
  for (int r = 0; r < MRT; ++r) {
    const float* src = first ? bias : Cm + r * ldc;
    if (!src) {
      for (int j = 0; j < V::NRV; ++j) acc[r][j] = V::zero();
      continue;
    }
    if (ncols < NR) {
      for (int j = 0; j < NR; ++j) tmp[j] = j < ncols ? src[j] : 0.f;
      src = tmp;
    }
    for (int j = 0; j < V::NRV; ++j) acc[r][j] = V::load(src + j * W);
  }
  for (int64_t p = 0; p < depth; ++p) {
    F bv[V::NRV];
    for (int j = 0; j < V::NRV; ++j) bv[j] = V::load(B + p * ldb + j * W);
    for (int r = 0; r < MRT; ++r) {
      F a = V::bcast(A[r * lda + p]);
      for (int j = 0; j < V::NRV; ++j) acc[r][j] = V::fma(a, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MRT; ++r) {
    if (ncols == NR) {
      for (int j = 0; j < V::NRV; ++j) V::store(Cm + r * ldc + j * W, acc[r][j]);
    } else {
      for (int j = 0; j < V::NRV; ++j) V::store(tmp + j * W, acc[r][j]);
      for (int64_t j = 0; j < ncols; ++j) Cm[r * ldc + j] = tmp[j];
    }
  }
}

template <int R>
static void micro_rows(int mr, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t depth,
                       float* Cm, int64_t ldc, int64_t ncols, bool first, const float* bias) {
  if (mr == R) return micro<R>(A, lda, B, ldb, depth, Cm, ldc, ncols, first, bias);
  if constexpr (R > 1) micro_rows<R - 1>(mr, A, lda, B, ldb, depth, Cm, ldc, ncols, first, bias);
}

// Runs the micro-kernel over rows [m0, m1) and columns [0, ncols) of a tile B[depth][ldb].
static void tile_product(const float* A, int64_t lda, int64_t m0, int64_t m1, const float* B, int64_t ldb,
                         int64_t depth, float* Cm, int64_t ldc, int64_t ncols, bool first,
                         const float* bias) {
  for (int64_t m = m0; m < m1; m += V::MR) {
    int mr = int(imin(V::MR, m1 - m));
    for (int64_t j = 0; j < ncols; j += NR)
      micro_rows<V::MR>(mr, A + m * lda, lda, B + j, ldb, depth, Cm + m * ldc + j, ldc,
                        imin(NR, ncols - j), first, bias ? bias + j : nullptr);
  }
}

// ---------------------------------------------------------------- larger M: forward
// buf[k - k0][bi * 32 + lane] = dequantized W[32 (b0 + bi) + lane][k]
template <ScaleType ST, bool ASYM>
static void dequant_tile(const Int4View& w, int64_t b0, int64_t nbc, int64_t k0, int64_t kc, float* buf) {
  const int64_t ldb = nbc * 32, gs = w.group_size;
  for (int64_t bi = 0; bi < nbc; ++bi) {
    const uint8_t* qb = w.qweight + (b0 + bi) * w.K * 16;
    int64_t g = k0 / gs;
    F s[NV], z[NV];
    load_group<ST, ASYM>(w, b0 + bi, g, s, z);
    for (int64_t k = k0; k < k0 + kc; ++k) {
      if (k / gs != g) load_group<ST, ASYM>(w, b0 + bi, ++g, s, z);
      F d[NV];
      decode(qb + k * 16, d);
      float* out = buf + (k - k0) * ldb + bi * 32;
      for (int v = 0; v < NV; ++v) V::store(out + v * W, V::mul(V::sub(d[v], z[v]), s[v]));
    }
  }
}

struct GemmCtx {
  const Int4View* w;
  const float* a;   // forward: x [M][K]; grad_input: gy [M][N]
  const float* bias;
  float* out;       // forward: y [M][N]; grad_input: gx [M][K]
  int64_t M, mchunk, mtasks;
};

template <ScaleType ST, bool ASYM>
static void gemm_fwd_task(void* p, int64_t begin, int64_t end) {
  const GemmCtx& c = *static_cast<const GemmCtx*>(p);
  const Int4View& w = *c.w;
  const int64_t N = w.N, K = w.K;
  float* buf = alloc_floats(KC * FWD_BLOCKS * 32);
  if (!buf) std::abort();
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b0 = (t / c.mtasks) * FWD_BLOCKS, nbc = imin(FWD_BLOCKS, w.nblocks() - b0);
    const int64_t n0 = b0 * 32, ncols = imin(N - n0, nbc * 32);
    const int64_t m0 = (t % c.mtasks) * c.mchunk, m1 = imin(c.M, m0 + c.mchunk);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = imin(KC, K - k0);
      dequant_tile<ST, ASYM>(w, b0, nbc, k0, kc, buf);
      tile_product(c.a + k0, K, m0, m1, buf, nbc * 32, kc, c.out + n0, N, ncols, k0 == 0,
                   c.bias ? c.bias + n0 : nullptr);
    }
  }
  std::free(buf);
}

// ---------------------------------------------------------------- larger M: grad_input
// bufT[n - n0][k - k0] = dequantized W[n][k] for n in [n0, n0 + nc), k in [k0, k0 + kt)
template <ScaleType ST, bool ASYM>
static void dequant_tile_t(const Int4View& w, int64_t n0, int64_t nc, int64_t k0, int64_t kt, float* bufT) {
  const int64_t gs = w.group_size;
  alignas(64) float tmp[32];
  for (int64_t b = n0 / 32; b * 32 < n0 + nc; ++b) {
    const uint8_t* qb = w.qweight + b * w.K * 16;
    const int64_t lanes = imin(32, n0 + nc - b * 32);
    float* rows = bufT + (b * 32 - n0) * KT;
    int64_t g = k0 / gs;
    F s[NV], z[NV];
    load_group<ST, ASYM>(w, b, g, s, z);
    for (int64_t k = k0; k < k0 + kt; ++k) {
      if (k / gs != g) load_group<ST, ASYM>(w, b, ++g, s, z);
      F d[NV];
      decode(qb + k * 16, d);
      for (int v = 0; v < NV; ++v) V::store(tmp + v * W, V::mul(V::sub(d[v], z[v]), s[v]));
      for (int64_t j = 0; j < lanes; ++j) rows[j * KT + (k - k0)] = tmp[j];
    }
  }
}

template <ScaleType ST, bool ASYM>
static void gemm_grad_task(void* p, int64_t begin, int64_t end) {
  const GemmCtx& c = *static_cast<const GemmCtx*>(p);
  const Int4View& w = *c.w;
  const int64_t N = w.N, K = w.K;
  float* bufT = alloc_floats(NCT * KT);
  if (!bufT) std::abort();
  for (int64_t t = begin; t < end; ++t) {
    const int64_t k0 = (t / c.mtasks) * KT, kt = imin(KT, K - k0);
    const int64_t m0 = (t % c.mtasks) * c.mchunk, m1 = imin(c.M, m0 + c.mchunk);
    for (int64_t n0 = 0; n0 < N; n0 += NCT) {
      const int64_t nc = imin(NCT, N - n0);
      dequant_tile_t<ST, ASYM>(w, n0, nc, k0, kt, bufT);
      tile_product(c.a + n0, N, m0, m1, bufT, KT, nc, c.out + k0, K, kt, n0 == 0, nullptr);
    }
  }
  std::free(bufT);
}

// ---------------------------------------------------------------- drivers
template <template <ScaleType, bool> class Pick>
static TaskFn pick(const Int4View& w) {
  const bool asym = w.zeros != nullptr;
  switch (w.scale_type) {
    case ScaleType::f32: return asym ? Pick<ScaleType::f32, true>::fn : Pick<ScaleType::f32, false>::fn;
    case ScaleType::f16: return asym ? Pick<ScaleType::f16, true>::fn : Pick<ScaleType::f16, false>::fn;
    default: return asym ? Pick<ScaleType::bf16, true>::fn : Pick<ScaleType::bf16, false>::fn;
  }
}
template <ScaleType ST, bool A> struct PickGemv { static constexpr TaskFn fn = gemv_task<ST, A>; };
template <ScaleType ST, bool A> struct PickFwd { static constexpr TaskFn fn = gemm_fwd_task<ST, A>; };
template <ScaleType ST, bool A> struct PickGrad { static constexpr TaskFn fn = gemm_grad_task<ST, A>; };

// Split M so that there are enough tasks for the threads when there are few column tiles.
static void split_rows(GemmCtx& c, int64_t col_tasks) {
  int64_t want = imax(1, cdiv(16, col_tasks));
  c.mtasks = imax(1, imin(want, c.M / (4 * V::MR)));
  c.mchunk = cdiv(cdiv(c.M, c.mtasks), V::MR) * V::MR;
  c.mtasks = cdiv(c.M, c.mchunk);
}

void linear(const Int4View& w, const float* x, int64_t M, const float* bias, float* y, ParallelFn par) {
  const int64_t K = w.K, G = w.ngroups();
  float* xp = nullptr;
  if (w.perm) {  // act-order: gather x's columns into the packed order
    xp = alloc_floats(M * K);
    if (!xp) std::abort();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xp[m * K + k] = x[m * K + w.perm[k]];
    x = xp;
  }
  if (M <= GEMV_MAX_M) {
    float* xsum = alloc_floats(M * G);
    if (!xsum) std::abort();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xsum[m * G + k / w.group_size] += x[m * K + k];
    GemvCtx c{&w, x, xsum, bias, y, M};
    par(w.nblocks(), &c, pick<PickGemv>(w));
    std::free(xsum);
  } else {
    GemmCtx c{&w, x, bias, y, M, M, 1};
    const int64_t col_tasks = cdiv(w.nblocks(), FWD_BLOCKS);
    split_rows(c, col_tasks);
    par(col_tasks * c.mtasks, &c, pick<PickFwd>(w));
  }
  std::free(xp);
}

void linear_grad_input(const Int4View& w, const float* gy, int64_t M, float* gx, ParallelFn par) {
  const int64_t K = w.K;
  float* gxp = w.perm ? alloc_floats(M * K) : gx;
  if (!gxp) std::abort();
  GemmCtx c{&w, gy, nullptr, gxp, M, M, 1};
  const int64_t col_tasks = cdiv(K, KT);
  split_rows(c, col_tasks);
  par(col_tasks * c.mtasks, &c, pick<PickGrad>(w));
  if (w.perm) {  // scatter back from the packed column order
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) gx[m * K + w.perm[k]] = gxp[m * K + k];
    std::free(gxp);
  }
}

}  // namespace CTP_ISA_NS
}  // namespace ctp
