// The packed-weight kernels, written once over a SIMD wrapper V (simd_*.h) and compiled once per
// instruction set: qlinear_<isa>.cpp defines CTP_ISA_NS and V, then includes this file. Each
// compilation lives in its own namespace, so no symbol built for one target is shared.
// No std:: templates here: a weak instantiation built for AVX-512 could be picked by the linker
// for the scalar path.
//
// Every layout is read through a column decoder (DenseDec, Sparse24Dec, UnstructuredDec): begin at
// block b, column k0, then next() yields the dequantized values of the block's 32 rows for one column
// after another. On top of the decoders:
//  * small M, dense 4-bit (gemv4): one pass over the packed weight, codes widened in registers,
//    the scale applied once per group: y += s * (sum(q x) - z * sum(x)).
//  * small M, 2:4 (gemv24): the kept codes meet x through an in-register permute of each quad of x.
//  * small M, other layouts (gemv_dec): decoder values times broadcast x.
//  * larger M (gemm_*): a cache-sized tile of W is dequantized into contiguous panels (KC x 128
//    forward, NCT x KT transposed for grad_input) and fed to a register-blocked FMA micro-kernel.
#include <cstdlib>
#include <cstring>

#include "qlinear.h"

namespace ctp {
namespace CTP_ISA_NS {

using F = typename V::F;
using I = typename V::I;
constexpr int W = V::W;
constexpr int C = 16 / W;       // byte chunks per 16-byte nibble column of a block
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
  if (!p) std::abort();
  std::memset(p, 0, bytes);
  return static_cast<float*>(p);
}

template <ScaleType ST>
static inline F load_scale(const void* base, int64_t idx) {
  if constexpr (ST == ScaleType::f32) return V::load(static_cast<const float*>(base) + idx);
  else if constexpr (ST == ScaleType::f16) return V::load_f16(static_cast<const uint16_t*>(base) + idx);
  else return V::load_bf16(static_cast<const uint16_t*>(base) + idx);
}

// Scales and zero points of one group of a block, loaded when the column enters a new group.
template <ScaleType ST, bool ASYM>
struct GroupState {
  F s[NV], z[NV];
  int64_t g = -1;
  void at(const QView& w, int64_t b, int64_t k) {
    if (k / w.group_size == g) return;
    g = k / w.group_size;
    const int64_t base = (b * w.ngroups() + g) * 32;
    const F zsym = V::bcast(float(1 << (w.bits - 1)));
    for (int v = 0; v < NV; ++v) {
      s[v] = load_scale<ST>(w.scales, base + v * W);
      z[v] = ASYM ? V::load_u8_float(w.zeros + base + v * W) : zsym;
    }
  }
  F value(int v, F code) const { return V::mul(V::sub(code, z[v]), s[v]); }
};

// Codes of one 16-byte nibble column (32 rows), as floats.
static inline void decode4(const uint8_t* p, F* d) {
  for (int c = 0; c < C; ++c) {
    I iv = V::load_u8(p + c * W);
    d[c] = V::low_nibble(iv);
    d[C + c] = V::high_nibble(iv);
  }
}

// 3-bit codes of one 12-byte column: row i at bits 3i..3i+2 of the little-endian stream.
static inline void decode3(const uint8_t* p, F* d) {
  alignas(64) uint8_t q[32];
  for (int i = 0; i < 32; ++i) {
    const int bit = 3 * i, byte = bit >> 3, sh = bit & 7;
    unsigned two = p[byte] | (byte + 1 < 12 ? unsigned(p[byte + 1]) << 8 : 0u);
    q[i] = uint8_t((two >> sh) & 7);
  }
  for (int v = 0; v < NV; ++v) d[v] = V::load_u8_float(q + v * W);
}

// ---------------------------------------------------------------- column decoders
template <ScaleType ST, bool ASYM, int BITS>
struct DenseDec {
  static constexpr int BYTES = 4 * BITS;  // bytes per 32-row column
  const uint8_t* p;
  int64_t b, k;
  GroupState<ST, ASYM> gs;
  void begin(const QView& w, int64_t b_, int64_t k0) {
    b = b_;
    k = k0;
    p = w.codes + (b * w.K + k0) * BYTES;
  }
  void next(const QView& w, F* out) {
    gs.at(w, b, k++);
    F d[NV];
    if constexpr (BITS == 4) decode4(p, d);
    else if constexpr (BITS == 8)
      for (int v = 0; v < NV; ++v) d[v] = V::load_u8_float(p + v * W);
    else decode3(p, d);
    p += BYTES;
    for (int v = 0; v < NV; ++v) out[v] = gs.value(v, d[v]);
  }
};

// One slot of a 2:4 quad (48 bytes at p): the rows' codes as floats, and their positions, one int
// lane per row (only the low 2 bits are meaningful after the shift; permute4 ignores the rest,
// select_eq callers mask them).
static inline void decode_slot24(const uint8_t* p, int slot, F* d, I* idx) {
  decode4(p + 16 * slot, d);
  for (int c = 0; c < C; ++c) {
    I iv = V::load_u8(p + 32 + c * W);
    idx[c] = V::srl(iv, 2 * slot);
    idx[C + c] = V::srl(iv, 2 * slot + 4);
  }
}

template <ScaleType ST, bool ASYM>
struct Sparse24Dec {
  F quad[4][NV];
  const uint8_t* p;  // the current quad's 48 bytes
  int64_t b, k;
  GroupState<ST, ASYM> gs;
  void begin(const QView& w, int64_t b_, int64_t k0) {  // k0 % 4 == 0
    b = b_;
    k = k0;
    p = w.codes + (b * (w.K / 4) + k0 / 4) * 48;
  }
  void next(const QView& w, F* out) {
    if (k % 4 == 0) {
      gs.at(w, b, k);  // group sizes are multiples of 4: one group per quad
      for (int c = 0; c < 4; ++c)
        for (int v = 0; v < NV; ++v) quad[c][v] = V::zero();
      for (int slot = 0; slot < 2; ++slot) {
        F d[NV];
        I idx[NV];
        decode_slot24(p, slot, d, idx);
        for (int v = 0; v < NV; ++v) {
          F val = gs.value(v, d[v]);
          I pos = V::and_(idx[v], 3);
          for (int c = 0; c < 4; ++c) quad[c][v] = V::add(quad[c][v], V::select_eq(pos, c, val));
        }
      }
      p += 48;
    }
    for (int v = 0; v < NV; ++v) out[v] = quad[k % 4][v];
    ++k;
  }
};

template <ScaleType ST, bool ASYM>
struct UnstructuredDec {
  int64_t b, k, nib;  // nib: nibble index of the current column's first kept code
  GroupState<ST, ASYM> gs;
  void begin(const QView& w, int64_t b_, int64_t k0) {
    b = b_;
    k = k0;
    nib = w.offsets[b * w.nchunks() + k0 / 32];
    for (int64_t kk = k0 / 32 * 32; kk < k0; ++kk) nib += __builtin_popcount(w.masks[b * w.K + kk]);
  }
  void next(const QView& w, F* out) {
    gs.at(w, b, k);
    alignas(64) uint8_t q[32] = {0}, kept[32] = {0};
    for (uint32_t m = w.masks[b * w.K + k]; m; m &= m - 1, ++nib) {
      const int i = __builtin_ctz(m);
      q[i] = (w.codes[nib >> 1] >> ((nib & 1) * 4)) & 15;
      kept[i] = 1;
    }
    ++k;
    for (int v = 0; v < NV; ++v)
      out[v] = V::mul(gs.value(v, V::load_u8_float(q + v * W)), V::load_u8_float(kept + v * W));
  }
};

// Writes the 32 lanes of a block row to out[n], n < N only, adding bias.
static inline void store_block(const F* acc, int64_t n0, int64_t N, const float* bias, float* out) {
  alignas(64) float tmp[32];
  for (int v = 0; v < NV; ++v) V::store(tmp + v * W, acc[v]);
  int64_t cnt = imin(32, N - n0);
  for (int64_t j = 0; j < cnt; ++j) out[n0 + j] = tmp[j] + (bias ? bias[n0 + j] : 0.f);
}

struct GemvCtx {
  const QView* w;
  const float* x;     // [M][K], packed column order
  const float* xsum;  // [M][G] (gemv4 only)
  const float* bias;
  float* y;
  int64_t M;
};

// ---------------------------------------------------------------- small M, dense 4-bit
// Cheaper decode: d[c] = whole byte (lo + 16 hi), d[C + c] = hi; sum(lo x) = sum(byte x) - 16 sum(hi x)
// is recovered once per group, saving a mask per vector.
static inline void decode_bytes(const uint8_t* p, F* d) {
  for (int c = 0; c < C; ++c) {
    I iv = V::load_u8(p + c * W);
    d[c] = V::byte_float(iv);
    d[C + c] = V::high_nibble(iv);
  }
}

template <int MRT, ScaleType ST, bool ASYM>
static void gemv4_block(const QView& w, int64_t b, const float* x, const float* xsum, int64_t m0,
                        const float* bias, float* y) {
  // Independent accumulator sets so that FMA latency is hidden when MRT * NV is small.
  constexpr int KU = (NV * MRT >= 8) ? 1 : 8 / (NV * MRT);
  const int64_t K = w.K, G = w.ngroups(), gsz = w.group_size;
  const uint8_t* qb = w.codes + b * K * 16;
  GroupState<ST, ASYM> gs;
  F yacc[MRT][NV];
  for (int r = 0; r < MRT; ++r)
    for (int v = 0; v < NV; ++v) yacc[r][v] = V::zero();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * gsz, k1 = imin(K, k0 + gsz);
    F acc[KU][MRT][NV];
    for (int u = 0; u < KU; ++u)
      for (int r = 0; r < MRT; ++r)
        for (int v = 0; v < NV; ++v) acc[u][r][v] = V::zero();
    int64_t k = k0;
    for (; k + KU <= k1; k += KU) {
      for (int u = 0; u < KU; ++u) {
        F d[NV];
        decode_bytes(qb + (k + u) * 16, d);
        for (int r = 0; r < MRT; ++r) {
          F xb = V::bcast(x[(m0 + r) * K + k + u]);
          for (int v = 0; v < NV; ++v) acc[u][r][v] = V::fma(d[v], xb, acc[u][r][v]);
        }
      }
    }
    for (; k < k1; ++k) {
      F d[NV];
      decode_bytes(qb + k * 16, d);
      for (int r = 0; r < MRT; ++r) {
        F xb = V::bcast(x[(m0 + r) * K + k]);
        for (int v = 0; v < NV; ++v) acc[0][r][v] = V::fma(d[v], xb, acc[0][r][v]);
      }
    }
    gs.at(w, b, k0);
    for (int r = 0; r < MRT; ++r) {
      F xs = V::bcast(xsum[(m0 + r) * G + g]);
      F a[NV];
      for (int v = 0; v < NV; ++v) {
        a[v] = acc[0][r][v];
        for (int u = 1; u < KU; ++u) a[v] = V::add(a[v], acc[u][r][v]);
      }
      for (int c = 0; c < C; ++c) a[c] = V::fma(V::bcast(-16.f), a[C + c], a[c]);  // lo = byte - 16 hi
      for (int v = 0; v < NV; ++v) yacc[r][v] = V::fma(gs.s[v], V::sub(a[v], V::mul(gs.z[v], xs)), yacc[r][v]);
    }
  }
  for (int r = 0; r < MRT; ++r) store_block(yacc[r], b * 32, w.N, bias, y + (m0 + r) * w.N);
}

template <ScaleType ST, bool ASYM>
static void gemv4_task(void* p, int64_t begin, int64_t end) {
  const GemvCtx& c = *static_cast<const GemvCtx*>(p);
  constexpr int MR = V::GEMV_MR;
  for (int64_t b = begin; b < end; ++b) {
    int64_t m = 0;
    for (; m + MR <= c.M; m += MR) gemv4_block<MR, ST, ASYM>(*c.w, b, c.x, c.xsum, m, c.bias, c.y);
    for (; m < c.M; ++m) gemv4_block<1, ST, ASYM>(*c.w, b, c.x, c.xsum, m, c.bias, c.y);
  }
}

// ---------------------------------------------------------------- small M, 2:4
// Per quad and slot: each row's kept code times x[4j + pos], x's quad picked by an in-register
// permute. Per group: y += s * (sum(q x_sel) - z * sum(x_sel)).
template <int MRT, ScaleType ST, bool ASYM>
static void gemv24_block(const QView& w, int64_t b, const float* x, int64_t m0, const float* bias, float* y) {
  const int64_t K = w.K, G = w.ngroups(), gsz = w.group_size;
  const uint8_t* qb = w.codes + b * (K / 4) * 48;
  GroupState<ST, ASYM> gs;
  F yacc[MRT][NV];
  for (int r = 0; r < MRT; ++r)
    for (int v = 0; v < NV; ++v) yacc[r][v] = V::zero();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * gsz, k1 = imin(K, k0 + gsz);
    F aq[MRT][NV], ax[MRT][NV];
    for (int r = 0; r < MRT; ++r)
      for (int v = 0; v < NV; ++v) aq[r][v] = ax[r][v] = V::zero();
    for (int64_t k = k0; k < k1; k += 4) {
      const uint8_t* p = qb + (k / 4) * 48;
      for (int slot = 0; slot < 2; ++slot) {
        F d[NV];
        I idx[NV];
        decode_slot24(p, slot, d, idx);
        for (int r = 0; r < MRT; ++r) {
          typename V::T4 xq = V::table4(x + (m0 + r) * K + k);
          for (int v = 0; v < NV; ++v) {
            F xs = V::permute4(xq, idx[v]);
            aq[r][v] = V::fma(d[v], xs, aq[r][v]);
            ax[r][v] = V::add(ax[r][v], xs);
          }
        }
      }
    }
    gs.at(w, b, k0);
    for (int r = 0; r < MRT; ++r)
      for (int v = 0; v < NV; ++v)
        yacc[r][v] = V::fma(gs.s[v], V::sub(aq[r][v], V::mul(gs.z[v], ax[r][v])), yacc[r][v]);
  }
  for (int r = 0; r < MRT; ++r) store_block(yacc[r], b * 32, w.N, bias, y + (m0 + r) * w.N);
}

template <ScaleType ST, bool ASYM>
static void gemv24_task(void* p, int64_t begin, int64_t end) {
  const GemvCtx& c = *static_cast<const GemvCtx*>(p);
  for (int64_t b = begin; b < end; ++b) {
    int64_t m = 0;
    for (; m + 2 <= c.M; m += 2) gemv24_block<2, ST, ASYM>(*c.w, b, c.x, m, c.bias, c.y);
    for (; m < c.M; ++m) gemv24_block<1, ST, ASYM>(*c.w, b, c.x, m, c.bias, c.y);
  }
}

// ---------------------------------------------------------------- small M, any layout
template <class Dec>
static void gemv_dec_task(void* p, int64_t begin, int64_t end) {
  const GemvCtx& c = *static_cast<const GemvCtx*>(p);
  const QView& w = *c.w;
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t m = 0; m < c.M; ++m) {
      F acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = V::zero();
      Dec dec;
      dec.begin(w, b, 0);
      for (int64_t k = 0; k < w.K; ++k) {
        F val[NV];
        dec.next(w, val);
        F xb = V::bcast(c.x[m * w.K + k]);
        for (int v = 0; v < NV; ++v) acc[v] = V::fma(val[v], xb, acc[v]);
      }
      store_block(acc, b * 32, w.N, c.bias, c.y + m * w.N);
    }
  }
}

// ---------------------------------------------------------------- micro-kernel
// C[r][j] (+)= sum_p A[r * lda + p] * B[p * NR + j] for r < MRT, j < ncols (<= NR).
// B is one packed panel (contiguous, so it stays in L1 across the rows of A).
// first: start from bias (or zero) instead of C.
template <int MRT>
static void micro(const float* A, int64_t lda, const float* B, int64_t depth, float* Cm, int64_t ldc,
                  int64_t ncols, bool first, const float* bias) {
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
    for (int j = 0; j < V::NRV; ++j) bv[j] = V::load(B + p * NR + j * W);
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
static void micro_rows(int mr, const float* A, int64_t lda, const float* B, int64_t depth, float* Cm,
                       int64_t ldc, int64_t ncols, bool first, const float* bias) {
  if (mr == R) return micro<R>(A, lda, B, depth, Cm, ldc, ncols, first, bias);
  if constexpr (R > 1) micro_rows<R - 1>(mr, A, lda, B, depth, Cm, ldc, ncols, first, bias);
}

// Panel-major tile: column j of row p lives at (j / NR) * panel_stride + p * NR + j % NR.
static inline float* panel_at(float* buf, int64_t panel_stride, int64_t p, int64_t j) {
  return buf + (j / NR) * panel_stride + p * NR + j % NR;
}

// Runs the micro-kernel over rows [m0, m1) and columns [0, ncols) of a panel-major tile.
static void tile_product(const float* A, int64_t lda, int64_t m0, int64_t m1, const float* B,
                         int64_t panel_stride, int64_t depth, float* Cm, int64_t ldc, int64_t ncols,
                         bool first, const float* bias) {
  for (int64_t m = m0; m < m1; m += V::MR) {
    int mr = int(imin(V::MR, m1 - m));
    for (int64_t j = 0; j < ncols; j += NR)
      micro_rows<V::MR>(mr, A + m * lda, lda, B + (j / NR) * panel_stride, depth, Cm + m * ldc + j, ldc,
                        imin(NR, ncols - j), first, bias ? bias + j : nullptr);
  }
}

struct GemmCtx {
  const QView* w;
  const float* a;   // forward: x [M][K]; grad_input: gy [M][N]
  const float* bias;
  float* out;       // forward: y [M][N]; grad_input: gx [M][K]
  int64_t M, mchunk, mtasks;
};

// ---------------------------------------------------------------- larger M: forward
// Tile (panel stride KC * NR): row k - k0, column bi * 32 + lane = W[32 (b0 + bi) + lane][k].
template <class Dec>
static void dequant_tile(const QView& w, int64_t b0, int64_t nbc, int64_t k0, int64_t kc, float* buf) {
  for (int64_t bi = 0; bi < nbc; ++bi) {
    Dec dec;
    dec.begin(w, b0 + bi, k0);
    for (int64_t k = k0; k < k0 + kc; ++k) {
      F val[NV];
      dec.next(w, val);
      for (int v = 0; v < NV; ++v) V::store(panel_at(buf, KC * NR, k - k0, bi * 32 + v * W), val[v]);
    }
  }
}

template <class Dec>
static void gemm_fwd_task(void* p, int64_t begin, int64_t end) {
  const GemmCtx& c = *static_cast<const GemmCtx*>(p);
  const QView& w = *c.w;
  const int64_t N = w.N, K = w.K;
  float* buf = alloc_floats(KC * FWD_BLOCKS * 32);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b0 = (t / c.mtasks) * FWD_BLOCKS, nbc = imin(FWD_BLOCKS, w.nblocks() - b0);
    const int64_t n0 = b0 * 32, ncols = imin(N - n0, nbc * 32);
    const int64_t m0 = (t % c.mtasks) * c.mchunk, m1 = imin(c.M, m0 + c.mchunk);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = imin(KC, K - k0);
      dequant_tile<Dec>(w, b0, nbc, k0, kc, buf);
      tile_product(c.a + k0, K, m0, m1, buf, KC * NR, kc, c.out + n0, N, ncols, k0 == 0,
                   c.bias ? c.bias + n0 : nullptr);
    }
  }
  std::free(buf);
}

// ---------------------------------------------------------------- larger M: grad_input
// Tile (panel stride NCT * NR): row n - n0, column k - k0 = W[n][k], n in [n0, n0 + nc), k in [k0, k0 + kt).
template <class Dec>
static void dequant_tile_t(const QView& w, int64_t n0, int64_t nc, int64_t k0, int64_t kt, float* bufT) {
  alignas(64) float tmp[32];
  for (int64_t b = n0 / 32; b * 32 < n0 + nc; ++b) {
    const int64_t lanes = imin(32, n0 + nc - b * 32);
    Dec dec;
    dec.begin(w, b, k0);
    for (int64_t k = k0; k < k0 + kt; ++k) {
      F val[NV];
      dec.next(w, val);
      for (int v = 0; v < NV; ++v) V::store(tmp + v * W, val[v]);
      float* col = panel_at(bufT, NCT * NR, b * 32 - n0, k - k0);
      for (int64_t j = 0; j < lanes; ++j) col[j * NR] = tmp[j];
    }
  }
}

template <class Dec>
static void gemm_grad_task(void* p, int64_t begin, int64_t end) {
  const GemmCtx& c = *static_cast<const GemmCtx*>(p);
  const QView& w = *c.w;
  const int64_t N = w.N, K = w.K;
  float* bufT = alloc_floats(NCT * KT);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t k0 = (t / c.mtasks) * KT, kt = imin(KT, K - k0);
    const int64_t m0 = (t % c.mtasks) * c.mchunk, m1 = imin(c.M, m0 + c.mchunk);
    for (int64_t n0 = 0; n0 < N; n0 += NCT) {
      const int64_t nc = imin(NCT, N - n0);
      dequant_tile_t<Dec>(w, n0, nc, k0, kt, bufT);
      tile_product(c.a + n0, N, m0, m1, bufT, NCT * NR, nc, c.out + k0, K, kt, n0 == 0, nullptr);
    }
  }
  std::free(bufT);
}

// ---------------------------------------------------------------- dispatch over layout x scales
// Kinds of task, each a template over the decoder (or, for the gemv fast paths, over ST and ASYM).
template <class Dec> struct FwdTask { static constexpr TaskFn fn = gemm_fwd_task<Dec>; };
template <class Dec> struct GradTask { static constexpr TaskFn fn = gemm_grad_task<Dec>; };
template <class Dec> struct GemvDecTask { static constexpr TaskFn fn = gemv_dec_task<Dec>; };

template <template <class> class Task, ScaleType ST, bool A>
static TaskFn pick_layout(const QView& w) {
  switch (w.layout) {
    case Layout::sparse24: return Task<Sparse24Dec<ST, A>>::fn;
    case Layout::unstructured: return Task<UnstructuredDec<ST, A>>::fn;
    default:
      if (w.bits == 8) return Task<DenseDec<ST, A, 8>>::fn;
      if (w.bits == 3) return Task<DenseDec<ST, A, 3>>::fn;
      return Task<DenseDec<ST, A, 4>>::fn;
  }
}

template <template <class> class Task>
static TaskFn pick(const QView& w) {
  const bool a = w.zeros != nullptr;
  switch (w.scale_type) {
    case ScaleType::f32: return a ? pick_layout<Task, ScaleType::f32, true>(w) : pick_layout<Task, ScaleType::f32, false>(w);
    case ScaleType::f16: return a ? pick_layout<Task, ScaleType::f16, true>(w) : pick_layout<Task, ScaleType::f16, false>(w);
    default: return a ? pick_layout<Task, ScaleType::bf16, true>(w) : pick_layout<Task, ScaleType::bf16, false>(w);
  }
}

template <ScaleType ST, bool A>
static TaskFn pick_gemv_fast(const QView& w) {
  return w.layout == Layout::sparse24 ? gemv24_task<ST, A> : gemv4_task<ST, A>;
}

static bool is_dense4(const QView& w) { return w.layout == Layout::dense && w.bits == 4; }

static TaskFn pick_gemv(const QView& w) {
  if (!is_dense4(w) && w.layout != Layout::sparse24) return pick<GemvDecTask>(w);
  const bool a = w.zeros != nullptr;
  switch (w.scale_type) {
    case ScaleType::f32: return a ? pick_gemv_fast<ScaleType::f32, true>(w) : pick_gemv_fast<ScaleType::f32, false>(w);
    case ScaleType::f16: return a ? pick_gemv_fast<ScaleType::f16, true>(w) : pick_gemv_fast<ScaleType::f16, false>(w);
    default: return a ? pick_gemv_fast<ScaleType::bf16, true>(w) : pick_gemv_fast<ScaleType::bf16, false>(w);
  }
}

// Split M so that there are enough tasks for the threads when there are few column tiles.
static void split_rows(GemmCtx& c, int64_t col_tasks) {
  int64_t want = imax(1, cdiv(16, col_tasks));
  c.mtasks = imax(1, imin(want, c.M / (4 * V::MR)));
  c.mchunk = cdiv(cdiv(c.M, c.mtasks), V::MR) * V::MR;
  c.mtasks = cdiv(c.M, c.mchunk);
}

void linear(const QView& w, const float* x, int64_t M, const float* bias, float* y, ParallelFn par) {
  const int64_t K = w.K, G = w.ngroups();
  float* xp = nullptr;
  if (w.perm) {  // act-order: gather x's columns into the packed order
    xp = alloc_floats(M * K);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xp[m * K + k] = x[m * K + w.perm[k]];
    x = xp;
  }
  if (M <= GEMV_MAX_M) {
    float* xsum = nullptr;  // per-group sums of x: only the dense 4-bit kernel applies zero points this way
    if (is_dense4(w)) {
      xsum = alloc_floats(M * G);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) xsum[m * G + k / w.group_size] += x[m * K + k];
    }
    GemvCtx c{&w, x, xsum, bias, y, M};
    par(w.nblocks(), &c, pick_gemv(w));
    std::free(xsum);
  } else {
    GemmCtx c{&w, x, bias, y, M, M, 1};
    const int64_t col_tasks = cdiv(w.nblocks(), FWD_BLOCKS);
    split_rows(c, col_tasks);
    par(col_tasks * c.mtasks, &c, pick<FwdTask>(w));
  }
  std::free(xp);
}

void linear_grad_input(const QView& w, const float* gy, int64_t M, float* gx, ParallelFn par) {
  const int64_t K = w.K;
  float* gxp = w.perm ? alloc_floats(M * K) : gx;
  GemmCtx c{&w, gy, nullptr, gxp, M, M, 1};
  const int64_t col_tasks = cdiv(K, KT);
  split_rows(c, col_tasks);
  par(col_tasks * c.mtasks, &c, pick<GradTask>(w));
  if (w.perm) {  // scatter back from the packed column order
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) gx[m * K + w.perm[k]] = gxp[m * K + k];
    std::free(gxp);
  }
}

}  // namespace CTP_ISA_NS
}  // namespace ctp
