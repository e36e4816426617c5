// Prompt-prefixed attention, compiled once per instruction set by attention_<isa>.cpp (which sets the
// target, -fno-trapping-math so the float selects in exp_nonpos vectorize, V and CTP_ISA_NS). See
// attention.h for the contract.
//
// Keys are visited in blocks of BK, each transposed into a [D][BK] scratch tile; scores, weighted values
// and gradients are small register-blocked GEMMs over a tile of query rows (all heads of a KV group), and
// the softmax runs over BK contiguous floats with no horizontal reduction, so it vectorizes too. The
// prompt's blocks and the sequence's own blocks are two segments of the same online softmax (running max
// m, running sum l, rescaled accumulator).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention.h"

namespace ctp {
namespace CTP_ISA_NS {
namespace {

constexpr int BK = 64;  // keys per block
constexpr int QT = 16;  // query rows per forward task
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (a little above 0 is fine too), with exp(-inf) = 0; branch-free (vectorizes),
// relative error about 2e-7.
inline float exp_nonpos(float x) {
  const float xc = x > -87.0f ? x : -87.0f;
  // n = round(xc / ln 2) by the 1.5 * 2^23 trick (std::floor and std::round do not vectorize)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

// One block of keys: rows k + j * kstride (j < n). Own keys sit at own positions j0 + j; prompt keys
// (j0 = -1) at prompt positions p0 + j.
struct Block {
  const float* k;
  const float* v;
  int64_t kstride, vstride;
  int64_t j0, p0;
  int n;  // keys in this block (<= BK)
};

// Transposes n rows of D floats (row stride `stride`) into t[D][BK], zero-padding columns n..BK-1.
inline void transpose_block(const float* src, int64_t stride, int n, int64_t D, float* t) {
  for (int64_t d = 0; d < D; ++d) std::fill(t + d * BK + n, t + (d + 1) * BK, 0.0f);
  for (int j = 0; j < n; ++j) {
    const float* row = src + j * stride;
    for (int64_t d = 0; d < D; ++d) t[d * BK + j] = row[d];
  }
}

// C[M x N] (+)= A[M x K] B[K x N] with A(i, k) = A[i * ars + k * acs], B and C row-major. A register-
// blocked micro-kernel (MR rows x 2 vectors) covers the columns in whole 2W steps; a plain loop the rest.
template <int MR>
inline void micro(const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C, int64_t ldc,
                  int64_t K, bool accumulate) {
  typename V::F c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = V::zero();
  for (int64_t k = 0; k < K; ++k) {
    const typename V::F b0 = V::load(B + k * ldb), b1 = V::load(B + k * ldb + V::W);
    for (int i = 0; i < MR; ++i) {
      const typename V::F a = V::bcast(A[i * ars + k * acs]);
      c0[i] = V::fma(a, b0, c0[i]);
      c1[i] = V::fma(a, b1, c1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* ci = C + i * ldc;
    V::store(ci, accumulate ? V::add(V::load(ci), c0[i]) : c0[i]);
    V::store(ci + V::W, accumulate ? V::add(V::load(ci + V::W), c1[i]) : c1[i]);
  }
}

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate) {
  constexpr int64_t NR = 2 * V::W;
  const int64_t Nv = N - N % NR;
  for (int64_t n0 = 0; n0 < Nv; n0 += NR) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) micro<4>(A + i * ars, ars, acs, B + n0, ldb, C + i * ldc + n0, ldc, K, accumulate);
    for (; i < M; ++i) micro<1>(A + i * ars, ars, acs, B + n0, ldb, C + i * ldc + n0, ldc, K, accumulate);
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t n = Nv; n < N; ++n) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += A[i * ars + k * acs] * B[k * ldb + n];
      C[i * ldc + n] = accumulate ? C[i * ldc + n] + acc : acc;
    }
}

// s[j] = exp(s[j] - shift) over a block.
inline void exp_block(float* s, float shift) {
  for (int j = 0; j < BK; ++j) s[j] = exp_nonpos(s[j] - shift);
}

// Max and sum of a block, as 16 lane-wise partials (a plain reduction loop would not vectorize).
inline float block_max(const float* s) {
  float part[16];
  std::fill(part, part + 16, NEG_INF);
  for (int j0 = 0; j0 < BK; j0 += 16)
    for (int t = 0; t < 16; ++t) part[t] = std::max(part[t], s[j0 + t]);
  return *std::max_element(part, part + 16);
}

inline float block_sum(const float* s) {
  float part[16] = {};
  for (int j0 = 0; j0 < BK; j0 += 16)
    for (int t = 0; t < 16; ++t) part[t] += s[j0 + t];
  float total = 0.0f;
  for (int t = 0; t < 16; ++t) total += part[t];
  return total;
}

// Masks scores outside [lo, hi] of own positions (and the padding columns >= n) to -inf.
inline void mask_block(const Block& blk, int64_t lo, int64_t hi, float* s) {
  for (int j = 0; j < BK; ++j) {
    const int64_t pos = blk.j0 + j;
    const bool keep = j < blk.n && (blk.j0 < 0 || (pos >= lo && pos <= hi));
    s[j] = keep ? s[j] : NEG_INF;
  }
}

// The visible own positions [lo, hi] of query row i of sequence b.
inline void own_range(const AttnArgs& a, int64_t b, int64_t i, int64_t* lo, int64_t* hi) {
  *lo = a.kv_start ? std::max<int64_t>(0, a.kv_start[b]) : 0;
  *hi = a.causal ? a.S - a.L + i : a.S - 1;
}

// The blocks of kv head g of sequence b: the prompt's, then the own keys in [lo, hi].
std::vector<Block> blocks_for(const AttnArgs& a, int64_t b, int64_t g, int64_t lo, int64_t hi) {
  std::vector<Block> out;
  for (int64_t j = 0; j < a.P; j += BK)
    out.push_back({a.kp + (g * a.P + j) * a.D, a.vp + (g * a.P + j) * a.D, a.D, a.D, -1, j,
                   int(std::min<int64_t>(BK, a.P - j))});
  const float* kb = a.k + b * a.ks[0] + g * a.ks[1];
  const float* vb = a.v + b * a.vs[0] + g * a.vs[1];
  for (int64_t j = lo; j <= hi; j += BK)
    out.push_back({kb + j * a.ks[2], vb + j * a.vs[2], a.ks[2], a.vs[2], j, -1,
                   int(std::min<int64_t>(BK, hi + 1 - j))});
  return out;
}

// A tile of query rows: rows r = gi * rows + ii are head g * G + gi, query i0 + ii of sequence b.
struct Tile {
  int64_t b, g, i0, rows, R;
  int64_t out_row(const AttnArgs& a, int64_t r) const {  // row index into [B, H, L]
    const int64_t G = a.H / a.Hkv;
    return (b * a.H + g * G + r / rows) * a.L + i0 + r % rows;
  }
  const float* q_row(const AttnArgs& a, int64_t r) const {
    const int64_t G = a.H / a.Hkv;
    return a.q + b * a.qs[0] + (g * G + r / rows) * a.qs[1] + (i0 + r % rows) * a.qs[2];
  }
};

struct FwdCtx {
  const AttnArgs* a;
  float* out;
  float* lse;
  int64_t tiles;  // query tiles per sequence
};

void fwd_task(void* vctx, int64_t begin, int64_t end) {
  const FwdCtx& c = *static_cast<FwdCtx*>(vctx);
  const AttnArgs& a = *c.a;
  const int64_t D = a.D, G = a.H / a.Hkv;
  std::vector<float> kt(D * BK), q(QT * G * D), acc(QT * G * D), s(QT * G * BK), m(QT * G), l(QT * G);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t t = task % c.tiles, g = (task / c.tiles) % a.Hkv, b = task / (c.tiles * a.Hkv);
    const int64_t i0 = t * QT, rows = std::min<int64_t>(QT, a.L - i0);
    const Tile tile{b, g, i0, rows, rows * G};
    const int64_t R = tile.R;
    int64_t lo, hi_first, hi_last;
    own_range(a, b, i0, &lo, &hi_first);
    own_range(a, b, i0 + rows - 1, &lo, &hi_last);
    std::fill(m.begin(), m.end(), NEG_INF);
    std::fill(l.begin(), l.end(), 0.0f);
    std::fill(acc.begin(), acc.begin() + R * D, 0.0f);
    for (int64_t r = 0; r < R; ++r) {  // q, pre-scaled
      const float* src = tile.q_row(a, r);
      for (int64_t d = 0; d < D; ++d) q[r * D + d] = src[d] * a.scale;
    }
    for (const Block& blk : blocks_for(a, b, g, lo, hi_last)) {
      transpose_block(blk.k, blk.kstride, blk.n, D, kt.data());
      gemm(R, BK, D, q.data(), D, 1, kt.data(), BK, s.data(), BK, false);  // scores
      for (int64_t r = 0; r < R; ++r) {  // online softmax: s becomes the block's weights
        float* sr = &s[r * BK];
        mask_block(blk, lo, hi_first + r % rows, sr);
        const float bm = block_max(sr);
        if (bm == NEG_INF) {  // nothing visible in this block
          std::fill(sr, sr + BK, 0.0f);
          continue;
        }
        const float mn = std::max(m[r], bm);
        const float alpha = m[r] == NEG_INF ? 0.0f : exp_nonpos(m[r] - mn);
        exp_block(sr, mn);
        l[r] = l[r] * alpha + block_sum(sr);
        m[r] = mn;
        float* ar = &acc[r * D];
        for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
      }
      gemm(R, D, blk.n, s.data(), BK, 1, blk.v, blk.vstride, acc.data(), D, true);  // acc += weights . V
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = tile.out_row(a, r);
      float* o = c.out + row * D;
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[r * D + d] * inv;
      c.lse[row] = l[r] > 0.0f ? m[r] + std::log(l[r]) : NEG_INF;
    }
  }
}

struct BwdCtx {
  const AttnArgs* a;
  const float *out, *lse, *gout;
  float *dq, *dk, *dv, *dkp_b, *dvp_b;
};

// One task per (sequence b, kv head g): it owns dq of the group's heads, dk/dv of (b, g) and the
// per-sequence prompt gradients of (b, g), so no two tasks write the same memory. With P the weights,
// dP = dO V^T, dS = P (dP - rowsum(dO * O)) * scale: dq = dS K, dk = dS^T q, dv = P^T dO.
void bwd_task(void* vctx, int64_t begin, int64_t end) {
  const BwdCtx& c = *static_cast<BwdCtx*>(vctx);
  const AttnArgs& a = *c.a;
  const int64_t D = a.D, G = a.H / a.Hkv, RT = QT * G;
  std::vector<float> kt(D * BK), vt(D * BK), q(RT * D), go(RT * D), dq(RT * D), p(RT * BK), ds(RT * BK),
      lse(RT), delta(RT);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t g = task % a.Hkv, b = task / a.Hkv;
    float* dkb = c.dk + (b * a.Hkv + g) * a.S * D;
    float* dvb = c.dv + (b * a.Hkv + g) * a.S * D;
    float* dkp = c.dkp_b + (b * a.Hkv + g) * a.P * D;
    float* dvp = c.dvp_b + (b * a.Hkv + g) * a.P * D;
    std::fill(dkb, dkb + a.S * D, 0.0f);  // own keys no query sees get no gradient
    std::fill(dvb, dvb + a.S * D, 0.0f);
    std::fill(dkp, dkp + a.P * D, 0.0f);
    std::fill(dvp, dvp + a.P * D, 0.0f);
    for (int64_t i0 = 0; i0 < a.L; i0 += QT) {
      const int64_t rows = std::min<int64_t>(QT, a.L - i0);
      const Tile tile{b, g, i0, rows, rows * G};
      const int64_t R = tile.R;
      int64_t lo, hi_first, hi_last;
      own_range(a, b, i0, &lo, &hi_first);
      own_range(a, b, i0 + rows - 1, &lo, &hi_last);
      for (int64_t r = 0; r < R; ++r) {  // gather q and dO rows; delta = dO . O
        const int64_t row = tile.out_row(a, r);
        std::memcpy(&q[r * D], tile.q_row(a, r), D * sizeof(float));
        std::memcpy(&go[r * D], c.gout + row * D, D * sizeof(float));
        float dl = 0.0f;
        for (int64_t d = 0; d < D; ++d) dl += go[r * D + d] * c.out[row * D + d];
        delta[r] = dl;
        lse[r] = c.lse[row];
      }
      std::fill(dq.begin(), dq.begin() + R * D, 0.0f);
      for (const Block& blk : blocks_for(a, b, g, lo, hi_last)) {
        transpose_block(blk.k, blk.kstride, blk.n, D, kt.data());
        transpose_block(blk.v, blk.vstride, blk.n, D, vt.data());
        gemm(R, BK, D, q.data(), D, 1, kt.data(), BK, p.data(), BK, false);    // q . k
        gemm(R, BK, D, go.data(), D, 1, vt.data(), BK, ds.data(), BK, false);  // dP = dO . v
        for (int64_t r = 0; r < R; ++r) {
          float* pr = &p[r * BK];
          float* dr = &ds[r * BK];
          for (int j = 0; j < BK; ++j) pr[j] *= a.scale;
          mask_block(blk, lo, hi_first + r % rows, pr);
          if (lse[r] == NEG_INF) std::fill(pr, pr + BK, NEG_INF);  // a row that sees nothing
          exp_block(pr, lse[r] == NEG_INF ? 0.0f : lse[r]);         // weights (<= 1 up to rounding)
          const float dl = delta[r];
          for (int j = 0; j < BK; ++j) dr[j] = pr[j] * (dr[j] - dl) * a.scale;
        }
        gemm(R, D, blk.n, ds.data(), BK, 1, blk.k, blk.kstride, dq.data(), D, true);  // dq += dS . k
        float* dkd = blk.j0 < 0 ? dkp + blk.p0 * D : dkb + blk.j0 * D;
        float* dvd = blk.j0 < 0 ? dvp + blk.p0 * D : dvb + blk.j0 * D;
        gemm(blk.n, D, R, ds.data(), 1, BK, q.data(), D, dkd, D, true);  // dk += dS^T . q
        gemm(blk.n, D, R, p.data(), 1, BK, go.data(), D, dvd, D, true);  // dv += P^T . dO
      }
      for (int64_t r = 0; r < R; ++r)
        std::memcpy(c.dq + tile.out_row(a, r) * D, &dq[r * D], D * sizeof(float));
    }
  }
}

}  // namespace

void prefix_attention_fwd(const AttnArgs& a, float* out, float* lse, ParallelFn par) {
  FwdCtx c{&a, out, lse, (a.L + QT - 1) / QT};
  par(a.B * a.Hkv * c.tiles, &c, fwd_task);
}

void prefix_attention_bwd(const AttnArgs& a, const float* out, const float* lse, const float* gout, float* dq,
                          float* dk, float* dv, float* dkp_b, float* dvp_b, ParallelFn par) {
  BwdCtx c{&a, out, lse, gout, dq, dk, dv, dkp_b, dvp_b};
  par(a.B * a.Hkv, &c, bwd_task);
}

}  // namespace CTP_ISA_NS
}  // namespace ctp
