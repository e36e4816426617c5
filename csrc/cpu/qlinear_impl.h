// The packed-weight kernels, written once over a SIMD wrapper V (simd_*.h) and compiled once per
// instruction set: qlinear_<isa>.cpp defines CTP_ISA_NS and V, then includes this file. Each
// compilation lives in its own namespace, so no symbol built for one target is shared.
// No std:: templates here: a weak instantiation built for AVX-512 could be picked by the linker
// for the scalar path.
//
// Every layout is read through a column decoder (DenseDec, Sparse24Dec, UnstructuredDec): begin at
// block b, column k0, then next() yields the dequantized values of the block's 32 rows for one column
// after another. On top of the decoders:
//  * small M, dense 4-bit and unstructured (gemv4): one pass over the packed weight, codes widened in
//    registers, the scale applied once per group: y += s * (sum(q x) - z * sum(x)) for dense; an
//    unstructured column is first rebuilt as a dense column of code - zero (UnstructuredCols), y += s * sum(d x).
//  * small M, 2:4 (gemv24): the kept codes meet x through an in-register permute of each quad of x.
//  * small M, other layouts (gemv_dec): decoder values times broadcast x.
//  * larger M (gemm_*): a cache-sized tile of W is dequantized into contiguous panels (KC x 128
//    forward, NCT x KT transposed for grad_input) and fed to a register-blocked FMA micro-kernel.
//    The 2:4 forward keeps its panels sparse (kept values and positions) and its micro-kernel does
//    half the FMAs, picking x through an in-register permute.
//  * bf16 activations at larger M on AVX512_BF16: qlinear_bf16.h, the same decoders and tiles in bf16 pairs.
#include <cstdio>
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
// Small-M kernels prefetch this far ahead in a block's stream: the hardware prefetcher alone left M=1
// dense int4 latency-bound at half the memory bandwidth (Intel Xeon VM, 2 threads: 0.90 -> 0.67 ms at 4096x4096,
// benchmarks/results/bench_formats_intel_avx512.md).
constexpr int64_t PF_BYTES = 2048;
constexpr int64_t KC = 256;       // forward tile depth (along K)
constexpr int64_t FWD_BLOCKS = 4; // forward tile width in 32-row blocks
constexpr int64_t NCT = 256;      // grad_input tile depth (along N)
constexpr int64_t KT = 128;       // grad_input tile width (along K)

// Hot helpers the compiler must inline (a call in the column loop spills every accumulator).
#define CTP_INLINE inline __attribute__((always_inline))

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

static void* alloc_zeroed(size_t bytes) {
  bytes = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes ? bytes : 64);
  if (!p) std::abort();
  std::memset(p, 0, bytes);
  return p;
}
static float* alloc_floats(int64_t n) { return static_cast<float*>(alloc_zeroed(size_t(n) * sizeof(float))); }

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

// Where a decoder reads a column's bytes: packed memory, or 64-bit words just computed (kept in
// registers: loading a vector of bytes just stored as two 8-byte halves stalls on store forwarding; on
// Zen 4 with AVX-512 that made M=1 unstructured 3.5x and 3-bit 6.5x slower).
struct MemBytes {
  const uint8_t* p;
  CTP_INLINE I u8(int o) const { return V::load_u8(p + o); }
  CTP_INLINE I s8(int o) const { return V::load_s8(p + o); }
};
struct WordBytes {
  const uint64_t* q;
  CTP_INLINE I u8(int o) const { return V::words_u8(q, o); }
  CTP_INLINE I s8(int o) const { return V::words_s8(q, o); }
};

// Codes of one 16-byte nibble column (32 rows), as floats.
template <class Src>
static CTP_INLINE void decode4(Src src, F* d) {
  for (int c = 0; c < C; ++c) {
    I iv = src.u8(c * W);
    d[c] = V::low_nibble(iv);
    d[C + c] = V::high_nibble(iv);
  }
}

// The same column holding signed 4-bit values (two's complement nibbles), as floats.
template <class Src>
static CTP_INLINE void decode4_signed(Src src, F* d) {
  for (int c = 0; c < C; ++c) {
    I iv = src.s8(c * W);  // lo | hi << 4, sign-extended from the high nibble
    d[c] = V::byte_float(V::sra(V::sll(iv, 28), 28));
    d[C + c] = V::byte_float(V::sra(iv, 4));
  }
}

// 3-bit codes of one 12-byte column: row i at bits 3i..3i+2 of the little-endian stream. Rows
// 8j..8j+7 are the 24 bits of bytes 3j..3j+2; a PDEP spreads them over 8 bytes, one code per byte.
static inline void decode3(const uint8_t* p, F* d) {
  uint64_t q[4];
  for (int j = 0; j < 4; ++j) {
    // 4-byte loads kept inside the column (the last group is bytes 8..11 shifted down; PDEP ignores
    // the bits above 24). Loading 3 bytes into a stack word instead stalls on store forwarding.
    uint32_t bits;
    std::memcpy(&bits, p + (j < 3 ? 3 * j : 8), 4);
    q[j] = V::pdep(j < 3 ? bits : bits >> 8, 0x0707070707070707ull);
  }
  for (int v = 0; v < NV; ++v) d[v] = V::byte_float(V::words_u8(q, v * W));
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
    if constexpr (BITS == 4) decode4(MemBytes{p}, d);
    else if constexpr (BITS == 8)
      for (int v = 0; v < NV; ++v) d[v] = V::load_u8_float(p + v * W);
    else decode3(p, d);
    p += BYTES;
    for (int v = 0; v < NV; ++v) out[v] = gs.value(v, d[v]);
  }
  void end(const QView&) {}
};

// The positions of one slot of a 2:4 quad (48 bytes at p), one int lane per row (only the low 2 bits
// are meaningful after the shift; permute4 ignores the rest, select_eq callers mask them).
static inline void positions24(const uint8_t* p, int slot, I* idx) {
  for (int c = 0; c < C; ++c) {
    I iv = V::load_u8(p + 32 + c * W);
    idx[c] = V::srl(iv, 2 * slot);
    idx[C + c] = V::srl(iv, 2 * slot + 4);
  }
}

// One slot of a 2:4 quad: the rows' codes as floats, and their positions.
static inline void decode_slot24(const uint8_t* p, int slot, F* d, I* idx) {
  decode4(MemBytes{p + 16 * slot}, d);
  positions24(p, slot, idx);
}

template <ScaleType ST_, bool ASYM_>
struct Sparse24Dec {
  static constexpr ScaleType ST = ST_;
  static constexpr bool ASYM = ASYM_;
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
  void end(const QView&) {}
};

// ---------------------------------------------------------------- column sources for the small-M kernel
// Dense: d[c] = whole byte (lo + 16 hi), d[C + c] = hi; sum(lo x) = sum(byte x) - 16 sum(hi x) is
// recovered once per group, saving a mask per vector.
static inline void decode_bytes(const uint8_t* p, F* d) {
  for (int c = 0; c < C; ++c) {
    I iv = V::load_u8(p + c * W);
    d[c] = V::byte_float(iv);
    d[C + c] = V::high_nibble(iv);
  }
}

// Reports masks that disagree with offsets entry `entry` (first report wins). Out of line: never hot.
__attribute__((noinline, cold)) static void report_disagreement(const QView& w, int64_t entry, int64_t want,
                                                                 int64_t found) {
  if (w.error && __atomic_exchange_n(&w.error->set, 1, __ATOMIC_RELAXED) == 0) {
    w.error->block = entry / w.nchunks();
    w.error->chunk = entry % w.nchunks();
    w.error->offset = want;
    w.error->found = found;
  }
}

// One 32-row column of an unstructured weight, turned back into a dense 4-bit column (16 bytes, row j
// in the low nibble of byte j, row 16 + j in the high one): per half (8 bytes = 16 nibbles, mask bits in
// the same nibble order) a PDEP spreads the kept entries over the nibbles of the kept rows; pruned rows
// get nibble 0. An entry is stored as code ^ zero point, so
//  * symmetric (zero point 8): the nibble is the two's complement 4-bit value code - 8;
//  * asymmetric: XOR with the zero points gives the code back, and zero point for a pruned row.
// Either way a pruned weight decodes to exactly (zero - zero) = 0, and every product is rounded once (no
// sum(q x) - z sum(x) cancellation, which would leave rounding noise on sparse or pruned rows).
// Cost per column is fixed (two PDEPs on the integer ports). PDEP is microcoded on AMD Zen 1/2.
template <bool ASYM>
struct UnstructuredCols {
  static constexpr bool CENTERED = true;  // decode() yields code - zero, not the code
  // Plain values only (no member's address is ever taken), so that the compiler keeps them in registers.
  const uint8_t* p;      // start of the next half-column
  const uint8_t* last;   // the last position an 8-byte load may start at
  const uint32_t* masks;
  const int64_t* offs;   // this block's offsets entries
  int64_t b, g, entries, k_next;  // entries: offsets entries from this block's first to the last one
  bool over;             // a read would have left the stream (masks disagree with offsets)
  uint64_t z0, z1;       // asymmetric: zero points of the current group, dense nibble layout
  void begin(const QView& w, int64_t b_, int64_t k0) {
    b = b_;
    g = -1;
    z0 = z1 = 0;
    over = false;
    masks = w.masks + b * w.K;
    offs = w.offsets + b * w.nchunks();
    entries = (w.nblocks() - b) * w.nchunks();
    last = w.codes + (w.codes_bytes - 8);
    p = w.codes + offs[k0 / 32];
    for (int64_t kk = k0 / 32 * 32; kk < k0; ++kk) p += half_bytes(masks[kk]) + half_bytes(masks[kk] >> 16);
    k_next = k0;
  }
  static int half_bytes(uint32_t m) { return (__builtin_popcount(m & 0xFFFF) + 1) >> 1; }
  // Where the masks brought us must be where offsets say column k (a multiple of 32, or K) starts; on a
  // disagreement report it and go on from offsets, so that reads stay inside the stream.
  CTP_INLINE void sync(const QView& w, int64_t k) {
    const int64_t e = k < w.K ? k / 32 : w.nchunks();
    const int64_t found = p - w.codes, want = e < entries ? offs[e] : found;
    if (__builtin_expect(found != want || p > last || over, 0)) {
      report_disagreement(w, b * w.nchunks() + e, want, found);
      p = w.codes + want;
      over = false;
    }
  }
  // After the last column decoded, check the position against the next offsets entry.
  void end(const QView& w) {
    if (k_next % 32 == 0 || k_next == w.K) sync(w, k_next);
  }
  // The dense column k (call for consecutive k) into col[2].
  CTP_INLINE void at(const QView& w, int64_t k, uint64_t* col) {
    if (ASYM && k / w.group_size != g) {
      g = k / w.group_size;
      const uint8_t* zr = w.zeros + (b * w.ngroups() + g) * 32;
      uint64_t v[2] = {0, 0};
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 8; ++j) v[h] |= uint64_t(zr[8 * h + j] | zr[16 + 8 * h + j] << 4) << (8 * j);
      z0 = v[0], z1 = v[1];
    }
    if (k % 32 == 0) sync(w, k);
    k_next = k + 1;
    const uint32_t m = masks[k];
    for (int h = 0; h < 2; ++h) {
      if (__builtin_expect(p > last, 0)) p = last, over = true;  // masks disagree with offsets: reported at sync
      const uint64_t mh = (m >> (16 * h)) & 0xFFFF;
      const uint64_t nibs = V::pdep(mh, 0x1111111111111111ull) * 15;  // each kept row's nibble all ones
      uint64_t raw;
      std::memcpy(&raw, p, 8);  // the stream ends with 8 spare bytes
      col[h] = V::pdep(raw, nibs);
      if constexpr (ASYM) col[h] ^= h ? z1 : z0;  // symmetric: the nibbles are already code - 8
      p += half_bytes(uint32_t(mh));
    }
  }
  CTP_INLINE void prefetch(const QView&, int64_t k) const {
    __builtin_prefetch(p + PF_BYTES);
    if (k % 16 == 0) __builtin_prefetch(masks + k + PF_BYTES / 4);
  }
  // Column k as code - zero (gs must hold k's group).
  template <class GS>
  CTP_INLINE void decode(const QView& w, int64_t k, const GS& gs, F* d) {
    uint64_t col[2];
    at(w, k, col);
    if constexpr (ASYM) {
      decode4(WordBytes{col}, d);
      for (int v = 0; v < NV; ++v) d[v] = V::sub(d[v], gs.z[v]);
    } else {
      decode4_signed(WordBytes{col}, d);
    }
  }
};

// Dense 4-bit columns for the small-M kernel: d[c] = whole byte (lo + 16 hi), d[C + c] = hi.
struct DenseCols {
  static constexpr bool CENTERED = false;
  const uint8_t* base;
  void begin(const QView& w, int64_t b, int64_t) { base = w.codes + b * w.K * 16; }
  void end(const QView&) {}
  template <class GS>
  CTP_INLINE void decode(const QView&, int64_t k, const GS&, F* d) const { decode_bytes(base + k * 16, d); }
  CTP_INLINE void prefetch(const QView&, int64_t k) const { __builtin_prefetch(base + k * 16 + PF_BYTES); }
};

template <ScaleType ST, bool ASYM>
struct UnstructuredDec {
  UnstructuredCols<ASYM> cols;
  int64_t b, k;
  GroupState<ST, ASYM> gs;
  void begin(const QView& w, int64_t b_, int64_t k0) {
    b = b_;
    k = k0;
    cols.begin(w, b, k0);
  }
  void next(const QView& w, F* out) {
    gs.at(w, b, k);
    F d[NV];
    cols.decode(w, k++, gs, d);
    for (int v = 0; v < NV; ++v) out[v] = V::mul(d[v], gs.s[v]);
  }
  void end(const QView& w) { cols.end(w); }
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

// ---------------------------------------------------------------- small M, dense 4-bit and unstructured

template <class Cols, int MRT, ScaleType ST, bool ASYM>
static void gemv4_block(const QView& w, int64_t b, const float* x, const float* xsum, int64_t m0,
                        const float* bias, float* y) {
  // Independent accumulator sets so that FMA latency is hidden when MRT * NV is small.
  constexpr int KU = (NV * MRT >= 8) ? 1 : 8 / (NV * MRT);
  const int64_t K = w.K, G = w.ngroups(), gsz = w.group_size;
  Cols cols;
  cols.begin(w, b, 0);
  GroupState<ST, ASYM> gs;  // a centered source reads the group's zero points while decoding
  F yacc[MRT][NV];
  for (int r = 0; r < MRT; ++r)
    for (int v = 0; v < NV; ++v) yacc[r][v] = V::zero();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * gsz, k1 = imin(K, k0 + gsz);
    F acc[KU][MRT][NV];
    for (int u = 0; u < KU; ++u)
      for (int r = 0; r < MRT; ++r)
        for (int v = 0; v < NV; ++v) acc[u][r][v] = V::zero();
    gs.at(w, b, k0);
    int64_t k = k0;
    for (; k + KU <= k1; k += KU) {
      cols.prefetch(w, k);
#pragma GCC unroll 8  // keeps acc in registers: rolled, acc[u] lives on the stack (store-forwarding per FMA)
      for (int u = 0; u < KU; ++u) {
        F d[NV];
        cols.decode(w, k + u, gs, d);
        for (int r = 0; r < MRT; ++r) {
          F xb = V::bcast(x[(m0 + r) * K + k + u]);
          for (int v = 0; v < NV; ++v) acc[u][r][v] = V::fma(d[v], xb, acc[u][r][v]);
        }
      }
    }
    for (; k < k1; ++k) {
      F d[NV];
      cols.decode(w, k, gs, d);
      for (int r = 0; r < MRT; ++r) {
        F xb = V::bcast(x[(m0 + r) * K + k]);
        for (int v = 0; v < NV; ++v) acc[0][r][v] = V::fma(d[v], xb, acc[0][r][v]);
      }
    }
    for (int r = 0; r < MRT; ++r) {
      F a[NV];
      for (int v = 0; v < NV; ++v) {
        a[v] = acc[0][r][v];
        for (int u = 1; u < KU; ++u) a[v] = V::add(a[v], acc[u][r][v]);
      }
      if constexpr (Cols::CENTERED) {
        for (int v = 0; v < NV; ++v) yacc[r][v] = V::fma(gs.s[v], a[v], yacc[r][v]);
      } else {
        F xs = V::bcast(xsum[(m0 + r) * G + g]);
        for (int c = 0; c < C; ++c) a[c] = V::fma(V::bcast(-16.f), a[C + c], a[c]);  // lo = byte - 16 hi
        for (int v = 0; v < NV; ++v) yacc[r][v] = V::fma(gs.s[v], V::sub(a[v], V::mul(gs.z[v], xs)), yacc[r][v]);
      }
    }
  }
  cols.end(w);
  for (int r = 0; r < MRT; ++r) store_block(yacc[r], b * 32, w.N, bias, y + (m0 + r) * w.N);
}

template <class Cols, ScaleType ST, bool ASYM>
static void gemv4_task(void* p, int64_t begin, int64_t end) {
  const GemvCtx& c = *static_cast<const GemvCtx*>(p);
  constexpr int MR = V::GEMV_MR;
  for (int64_t b = begin; b < end; ++b) {
    int64_t m = 0;
    for (; m + MR <= c.M; m += MR) gemv4_block<Cols, MR, ST, ASYM>(*c.w, b, c.x, c.xsum, m, c.bias, c.y);
    for (; m < c.M; ++m) gemv4_block<Cols, 1, ST, ASYM>(*c.w, b, c.x, c.xsum, m, c.bias, c.y);
  }
}

// ---------------------------------------------------------------- small M, 2:4
// Symmetric 4-bit codes of one 16-byte column as code - 8, through VV's 16-entry table: one permute per
// vector, no mask, no convert. Only for ISAs with V::LUT16 (a template, so others need no table).
template <class VV>
static CTP_INLINE void decode4_centered(const uint8_t* p, F* d) {
  static const float centered[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
  const typename VV::T16 tab = VV::table16(centered);
  for (int c = 0; c < C; ++c) {
    I iv = VV::load_u8(p + c * W);
    d[c] = VV::lookup16(tab, iv);
    d[C + c] = VV::lookup16(tab, VV::srl(iv, 4));
  }
}

// Per quad and slot: each row's kept code times x[4j + pos], x's quad picked by an in-register
// permute. Per group: y += s * (sum(q x_sel) - z * sum(x_sel)). Symmetric codes on an ISA with a cheap
// 16-entry table (V::LUT16, AVX-512) are looked up as code - 8 directly, so no sum(x_sel) is kept and
// no mask or convert is needed: about a quarter fewer instructions per slot.
template <int MRT, ScaleType ST, bool ASYM>
static void gemv24_block(const QView& w, int64_t b, const float* x, int64_t m0, const float* bias, float* y) {
  constexpr bool LUT = V::LUT16 && !ASYM;
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
      __builtin_prefetch(p + PF_BYTES);
      for (int slot = 0; slot < 2; ++slot) {
        F d[NV];
        I idx[NV];
        positions24(p, slot, idx);
        if constexpr (LUT) decode4_centered<V>(p + 16 * slot, d);
        else decode4(MemBytes{p + 16 * slot}, d);
        for (int r = 0; r < MRT; ++r) {
          typename V::T4 xq = V::table4(x + (m0 + r) * K + k);
          for (int v = 0; v < NV; ++v) {
            F xs = V::permute4(xq, idx[v]);
            aq[r][v] = V::fma(d[v], xs, aq[r][v]);
            if constexpr (!LUT) ax[r][v] = V::add(ax[r][v], xs);
          }
        }
      }
    }
    gs.at(w, b, k0);
    for (int r = 0; r < MRT; ++r)
      for (int v = 0; v < NV; ++v)
        yacc[r][v] = LUT ? V::fma(gs.s[v], aq[r][v], yacc[r][v])
                         : V::fma(gs.s[v], V::sub(aq[r][v], V::mul(gs.z[v], ax[r][v])), yacc[r][v]);
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
      dec.end(w);
      store_block(acc, b * 32, w.N, c.bias, c.y + m * w.N);
    }
  }
}

// ---------------------------------------------------------------- micro-kernel
// The accumulators of an MRT x NR micro-kernel: start from C, or (first) from bias or zero; columns
// >= ncols are neither read nor written.
template <int MRT>
static CTP_INLINE void load_acc(F (*acc)[V::NRV], const float* Cm, int64_t ldc, int64_t ncols, bool first,
                                const float* bias) {
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
}

template <int MRT>
static CTP_INLINE void store_acc(F (*acc)[V::NRV], float* Cm, int64_t ldc, int64_t ncols) {
  alignas(64) float tmp[NR];
  for (int r = 0; r < MRT; ++r) {
    if (ncols == NR) {
      for (int j = 0; j < V::NRV; ++j) V::store(Cm + r * ldc + j * W, acc[r][j]);
    } else {
      for (int j = 0; j < V::NRV; ++j) V::store(tmp + j * W, acc[r][j]);
      for (int64_t j = 0; j < ncols; ++j) Cm[r * ldc + j] = tmp[j];
    }
  }
}

// C[r][j] (+)= sum_p A[r * lda + p] * B[p * NR + j] for r < MRT, j < ncols (<= NR).
// B is one packed panel (contiguous, so it stays in L1 across the rows of A).
// first: start from bias (or zero) instead of C.
// S24: B is a 2:4 panel (dequant_tile24): per quad of depth, rows [slot 0 values][slot 0 positions]
// [slot 1 values][slot 1 positions]; each column's kept weight meets A's element at its position through
// an in-register permute of A's quad, so half the FMAs of the dense panel (plus as many permutes, which
// run on other ports).
template <int MRT, bool S24>
static void micro(const float* A, int64_t lda, const float* B, int64_t depth, float* Cm, int64_t ldc,
                  int64_t ncols, bool first, const float* bias) {
  F acc[MRT][V::NRV];
  load_acc<MRT>(acc, Cm, ldc, ncols, first, bias);
  if constexpr (S24) {
    for (int64_t p = 0; p < depth; p += 4) {
      for (int slot = 0; slot < 2; ++slot) {
        const float* bq = B + (p + 2 * slot) * NR;
        F bv[V::NRV];
        I pos[V::NRV];
        for (int j = 0; j < V::NRV; ++j) bv[j] = V::load(bq + j * W), pos[j] = V::load_i(bq + NR + j * W);
        for (int r = 0; r < MRT; ++r) {
          typename V::T4 a4 = V::table4(A + r * lda + p);
          for (int j = 0; j < V::NRV; ++j) acc[r][j] = V::fma(bv[j], V::permute4(a4, pos[j]), acc[r][j]);
        }
      }
    }
  } else {
    for (int64_t p = 0; p < depth; ++p) {
      F bv[V::NRV];
      for (int j = 0; j < V::NRV; ++j) bv[j] = V::load(B + p * NR + j * W);
      for (int r = 0; r < MRT; ++r) {
        F a = V::bcast(A[r * lda + p]);
        for (int j = 0; j < V::NRV; ++j) acc[r][j] = V::fma(a, bv[j], acc[r][j]);
      }
    }
  }
  store_acc<MRT>(acc, Cm, ldc, ncols);
}

template <int R, bool S24>
static void micro_rows(int mr, const float* A, int64_t lda, const float* B, int64_t depth, float* Cm,
                       int64_t ldc, int64_t ncols, bool first, const float* bias) {
  if (mr == R) return micro<R, S24>(A, lda, B, depth, Cm, ldc, ncols, first, bias);
  if constexpr (R > 1) micro_rows<R - 1, S24>(mr, A, lda, B, depth, Cm, ldc, ncols, first, bias);
}

// Panel-major tile: column j of row p lives at (j / NR) * panel_stride + p * NR + j % NR.
static inline float* panel_at(float* buf, int64_t panel_stride, int64_t p, int64_t j) {
  return buf + (j / NR) * panel_stride + p * NR + j % NR;
}

// Runs the micro-kernel over rows [m0, m1) and columns [0, ncols) of a panel-major tile.
template <bool S24 = false>
static void tile_product(const float* A, int64_t lda, int64_t m0, int64_t m1, const float* B,
                         int64_t panel_stride, int64_t depth, float* Cm, int64_t ldc, int64_t ncols,
                         bool first, const float* bias) {
  constexpr int MR = S24 ? V::MR24 : V::MR;
  for (int64_t m = m0; m < m1; m += MR) {
    int mr = int(imin(MR, m1 - m));
    for (int64_t j = 0; j < ncols; j += NR)
      micro_rows<MR, S24>(mr, A + m * lda, lda, B + (j / NR) * panel_stride, depth, Cm + m * ldc + j, ldc,
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
    dec.end(w);
  }
}

// 2:4 tile, same size and panel stride: per quad of depth, four panel rows (see micro), the
// positions kept as int bits (permute4 reads their low 2 bits). An unused slot holds value 0.
template <ScaleType ST, bool ASYM>
static void dequant_tile24(const QView& w, int64_t b0, int64_t nbc, int64_t k0, int64_t kc, float* buf) {
  for (int64_t bi = 0; bi < nbc; ++bi) {
    GroupState<ST, ASYM> gs;
    const uint8_t* p = w.codes + ((b0 + bi) * (w.K / 4) + k0 / 4) * 48;
    for (int64_t k = k0; k < k0 + kc; k += 4, p += 48) {
      gs.at(w, b0 + bi, k);  // group sizes are multiples of 4: one group per quad
      for (int slot = 0; slot < 2; ++slot) {
        F d[NV];
        I idx[NV];
        decode_slot24(p, slot, d, idx);
        for (int v = 0; v < NV; ++v) {
          V::store(panel_at(buf, KC * NR, k - k0 + 2 * slot, bi * 32 + v * W), gs.value(v, d[v]));
          V::store_i(panel_at(buf, KC * NR, k - k0 + 2 * slot + 1, bi * 32 + v * W), idx[v]);
        }
      }
    }
  }
}

template <class Dec, bool S24 = false>
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
      if constexpr (S24) dequant_tile24<Dec::ST, Dec::ASYM>(w, b0, nbc, k0, kc, buf);
      else dequant_tile<Dec>(w, b0, nbc, k0, kc, buf);
      tile_product<S24>(c.a + k0, K, m0, m1, buf, KC * NR, kc, c.out + n0, N, ncols, k0 == 0,
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
    dec.end(w);
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
template <ScaleType ST, bool A> struct FwdTask<Sparse24Dec<ST, A>> {  // 2:4: the permute micro-kernel, or dense panels
  static constexpr TaskFn fn = gemm_fwd_task<Sparse24Dec<ST, A>, V::S24_MICRO>;
};
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

// Split M so that there are about `tasks` tasks for the threads when there are few column tiles, and into at
// least min_chunks row chunks (each chunk dequantizes W again; chunks are at least 4 micro-kernel rows).
template <class Ctx>
static void split_rows(Ctx& c, int64_t col_tasks, int64_t tasks = 16, int64_t min_chunks = 1) {
  int64_t want = imax(min_chunks, cdiv(tasks, col_tasks));
  c.mtasks = imax(1, imin(want, c.M / (4 * V::MR)));
  c.mchunk = cdiv(cdiv(c.M, c.mtasks), V::MR) * V::MR;
  c.mtasks = cdiv(c.M, c.mchunk);
}

// grad_input computed in the packed column order (act-order): gx[:, perm[k]] = gxp[:, k], gxp freed.
static void scatter_perm(const QView& w, float* gxp, int64_t M, float* gx) {
  if (!w.perm) return;
  const int64_t K = w.K;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) gx[m * K + w.perm[k]] = gxp[m * K + k];
  std::free(gxp);
}

// The fp32 entry points; the bf16 compilation (qlinear_avx512bf16.cpp) has only its own, in qlinear_bf16.h.
#ifndef CTP_BF16_GEMM
template <ScaleType ST, bool A>
static TaskFn pick_gemv_fast(const QView& w) {
  switch (w.layout) {
    case Layout::sparse24: return gemv24_task<ST, A>;
    case Layout::unstructured: return gemv4_task<UnstructuredCols<A>, ST, A>;
    default: return gemv4_task<DenseCols, ST, A>;
  }
}

static bool is_dense4(const QView& w) { return w.layout == Layout::dense && w.bits == 4; }

static TaskFn pick_gemv(const QView& w) {
  if (w.layout == Layout::dense && w.bits != 4) return pick<GemvDecTask>(w);
  const bool a = w.zeros != nullptr;
  switch (w.scale_type) {
    case ScaleType::f32: return a ? pick_gemv_fast<ScaleType::f32, true>(w) : pick_gemv_fast<ScaleType::f32, false>(w);
    case ScaleType::f16: return a ? pick_gemv_fast<ScaleType::f16, true>(w) : pick_gemv_fast<ScaleType::f16, false>(w);
    default: return a ? pick_gemv_fast<ScaleType::bf16, true>(w) : pick_gemv_fast<ScaleType::bf16, false>(w);
  }
}

const char* check_unstructured(const QView& w) {
  const int64_t codes_bytes = w.codes_bytes;
  static thread_local char msg[256];
  const int64_t K = w.K, N = w.N, chunks = w.nchunks();
  int64_t pos = 0;  // bytes of codes before (b, k)
  for (int64_t b = 0; b < w.nblocks(); ++b) {
    uint32_t allowed = 0;  // nibble-order bits of the rows below N
    for (int p = 0; p < 32; ++p)
      if (b * 32 + (p & 1) * 16 + (p >> 1) < N) allowed |= 1u << p;
    for (int64_t k = 0; k < K; ++k) {
      if (k % 32 == 0 && w.offsets[b * chunks + k / 32] != pos) {
        std::snprintf(msg, sizeof msg, "offsets: entry [%lld, %lld] is %lld but the masks before it hold %lld bytes of codes",
                      (long long)b, (long long)(k / 32), (long long)w.offsets[b * chunks + k / 32], (long long)pos);
        return msg;
      }
      const uint32_t m = w.masks[b * K + k];
      if (m & ~allowed) {
        std::snprintf(msg, sizeof msg, "masks: block %lld column %lld keeps rows past out_features=%lld", (long long)b,
                      (long long)k, (long long)N);
        return msg;
      }
      pos += UnstructuredCols<false>::half_bytes(m) + UnstructuredCols<false>::half_bytes(m >> 16);
    }
  }
  if (pos + 8 > codes_bytes) {
    std::snprintf(msg, sizeof msg, "codes: the masks keep %lld bytes of codes (and 8 spare bytes follow) but the stream "
                  "holds only %lld bytes", (long long)pos, (long long)codes_bytes);
    return msg;
  }
  return nullptr;
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
  scatter_perm(w, gxp, M, gx);
}

#endif  // CTP_BF16_GEMM

}  // namespace CTP_ISA_NS
}  // namespace ctp
