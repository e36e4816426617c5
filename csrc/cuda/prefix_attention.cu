// Prompt-prefixed attention, forward and backward (see kernels.h for the exact semantics).
//
// Keys are numbered [prefix 0..P-1 ; own 0..S-1]. The forward is split-KV flash decoding: a warp owns
// one query row (lanes split D), walks its share of the keys with an online softmax in fp32, and
// writes a partial (normalized output, log-sum-exp); a merge kernel combines the splits by their
// log-sum-exp (FlashInfer's merge_state). The shared prefix K/V is just the first P keys of every
// query's walk: no copy, no concatenation, read by all sequences from the same memory.
// The backward recomputes probabilities from the saved lse: dq per query row (warp per row), dk/dv
// per key (warp per key, looping over the queries that see it, all heads of its GQA group); prefix
// keys accumulate over the batch into fp32 buffers with atomicAdd.
#include <cmath>

#include "common.cuh"

namespace ctp_cuda {
namespace {

constexpr int kWarps = 4;
constexpr float kNegInf = -INFINITY;

// Own keys query i (of batch b) attends: [lo, hi).
__device__ __forceinline__ void own_range(const AttnArgs& a, int b, int i, int& lo, int& hi) {
  lo = a.kv_start ? max(0, a.kv_start[b]) : 0;
  hi = a.causal ? min(a.S, a.S - a.L + i + 1) : a.S;
}

// Lane's slice of a D-vector: elements lane + 32e.
template <typename T, int E> __device__ __forceinline__ void load_row(const T* p, int D, int lane, float (&r)[E]) {
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d = lane + 32 * e;
    r[e] = d < D ? to_float(p[d]) : 0.f;
  }
}
template <int E> __device__ __forceinline__ float dot(const float (&a)[E], const float (&b)[E]) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) s += a[e] * b[e];
  return warp_sum(s);
}

// -------------------------------------------------------------------- forward
template <typename T, int E>
__global__ void __launch_bounds__(kWarps * 32) attn_fwd_kernel(AttnArgs a, const T* __restrict__ q,
                                                               const T* __restrict__ k, const T* __restrict__ v,
                                                               const T* __restrict__ kp, const T* __restrict__ vp,
                                                               float* __restrict__ part_o, float* __restrict__ part_lse,
                                                               int keys_per_split) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32, rows = int64_t(a.B) * a.H * a.L;
  if (row >= rows) return;
  const int i = int(row % a.L), h = int(row / a.L % a.H), b = int(row / a.L / a.H), hk = h / (a.H / a.Hkv);
  const int t0 = blockIdx.y * keys_per_split, t1 = min(a.P + a.S, t0 + keys_per_split);
  int lo, hi;
  own_range(a, b, i, lo, hi);
  float qr[E], o[E] = {}, kr[E], vr[E];
  load_row<T, E>(q + b * a.q_s[0] + h * a.q_s[1] + i * a.q_s[2], a.D, lane, qr);
#pragma unroll
  for (int e = 0; e < E; ++e) qr[e] *= a.scale;
  float m = kNegInf, l = 0.f;
  auto visit = [&](const T* kq, const T* vq) {
    load_row<T, E>(kq, a.D, lane, kr);
    const float s = dot<E>(qr, kr);
    load_row<T, E>(vq, a.D, lane, vr);
    const float m_new = fmaxf(m, s), corr = __expf(m - m_new), p = __expf(s - m_new);
    l = l * corr + p;
#pragma unroll
    for (int e = 0; e < E; ++e) o[e] = o[e] * corr + p * vr[e];
    m = m_new;
  };
  for (int t = t0; t < min(t1, a.P); ++t)  // shared prefix keys
    visit(kp + hk * a.kp_s[0] + t * a.kp_s[1], vp + hk * a.vp_s[0] + t * a.vp_s[1]);
  for (int j = max(t0 - a.P, lo); j < min(t1 - a.P, hi); ++j)  // own keys
    visit(k + b * a.k_s[0] + hk * a.k_s[1] + j * a.k_s[2], v + b * a.v_s[0] + hk * a.v_s[1] + j * a.v_s[2]);
  const int64_t slot = blockIdx.y * rows + row;
  float* po = part_o + slot * a.D;
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e)
    if (lane + 32 * e < a.D) po[lane + 32 * e] = o[e] * inv;
  if (lane == 0) part_lse[slot] = l > 0.f ? m + __logf(l) : kNegInf;
}

template <typename T, int E>
__global__ void attn_merge_kernel(AttnArgs a, const float* __restrict__ part_o, const float* __restrict__ part_lse,
                                  int splits, T* __restrict__ out, float* __restrict__ lse) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32, rows = int64_t(a.B) * a.H * a.L;
  if (row >= rows) return;
  float mx = kNegInf;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, part_lse[s * rows + row]);
  float o[E] = {}, sum = 0.f;
  if (mx != kNegInf)
    for (int s = 0; s < splits; ++s) {
      const float ls = part_lse[s * rows + row];
      if (ls == kNegInf) continue;
      const float wgt = __expf(ls - mx);
      sum += wgt;
#pragma unroll
      for (int e = 0; e < E; ++e)
        if (lane + 32 * e < a.D) o[e] += wgt * part_o[(s * rows + row) * a.D + lane + 32 * e];
    }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e)
    if (lane + 32 * e < a.D) out[row * a.D + lane + 32 * e] = Half<T>::from_float(o[e] * inv);
  if (lane == 0) lse[row] = sum > 0.f ? mx + __logf(sum) : kNegInf;
}

// -------------------------------------------------------------------- backward
template <typename T, int E>
__global__ void attn_delta_kernel(AttnArgs a, const T* __restrict__ go, const T* __restrict__ out,
                                  float* __restrict__ delta) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32, rows = int64_t(a.B) * a.H * a.L;
  if (row >= rows) return;
  float x[E], y[E];
  load_row<T, E>(go + row * a.D, a.D, lane, x);
  load_row<T, E>(out + row * a.D, a.D, lane, y);
  const float d = dot<E>(x, y);
  if (lane == 0) delta[row] = d;
}

template <typename T, int E>
__global__ void __launch_bounds__(kWarps * 32) attn_dq_kernel(AttnArgs a, const T* __restrict__ go,
                                                              const T* __restrict__ q, const T* __restrict__ k,
                                                              const T* __restrict__ v, const T* __restrict__ kp,
                                                              const T* __restrict__ vp, const float* __restrict__ lse,
                                                              const float* __restrict__ delta, T* __restrict__ dq) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32, rows = int64_t(a.B) * a.H * a.L;
  if (row >= rows) return;
  const int i = int(row % a.L), h = int(row / a.L % a.H), b = int(row / a.L / a.H), hk = h / (a.H / a.Hkv);
  int lo, hi;
  own_range(a, b, i, lo, hi);
  float qr[E], gr[E], kr[E], vr[E], acc[E] = {};
  load_row<T, E>(q + b * a.q_s[0] + h * a.q_s[1] + i * a.q_s[2], a.D, lane, qr);
  load_row<T, E>(go + row * a.D, a.D, lane, gr);
  const float ls = lse[row], dl = delta[row];
  if (ls != kNegInf) {
    auto visit = [&](const T* kq, const T* vq) {
      load_row<T, E>(kq, a.D, lane, kr);
      load_row<T, E>(vq, a.D, lane, vr);
      const float p = __expf(a.scale * dot<E>(qr, kr) - ls), ds = p * (dot<E>(gr, vr) - dl);
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += ds * kr[e];
    };
    for (int t = 0; t < a.P; ++t) visit(kp + hk * a.kp_s[0] + t * a.kp_s[1], vp + hk * a.vp_s[0] + t * a.vp_s[1]);
    for (int j = lo; j < hi; ++j)
      visit(k + b * a.k_s[0] + hk * a.k_s[1] + j * a.k_s[2], v + b * a.v_s[0] + hk * a.v_s[1] + j * a.v_s[2]);
  }
#pragma unroll
  for (int e = 0; e < E; ++e)
    if (lane + 32 * e < a.D) dq[row * a.D + lane + 32 * e] = Half<T>::from_float(a.scale * acc[e]);
}

// One warp per key: keys 0..P-1 of kv head hk are the prefix (accumulated over b into fp32 with
// atomics), keys P.. are batch b's own keys (written once).
template <typename T, int E>
__global__ void __launch_bounds__(kWarps * 32) attn_dkdv_kernel(
    AttnArgs a, const T* __restrict__ go, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ kp, const T* __restrict__ vp, const float* __restrict__ lse, const float* __restrict__ delta,
    T* __restrict__ dk, T* __restrict__ dv, float* __restrict__ dkp, float* __restrict__ dvp) {
  const int lane = threadIdx.x % 32;
  const int key = blockIdx.x * kWarps + threadIdx.x / 32, hk = blockIdx.y, b = blockIdx.z;
  if (key >= a.P + a.S) return;
  const bool prefix = key < a.P;
  const int j = key - a.P;
  const T* kq = prefix ? kp + hk * a.kp_s[0] + key * a.kp_s[1] : k + b * a.k_s[0] + hk * a.k_s[1] + j * a.k_s[2];
  const T* vq = prefix ? vp + hk * a.vp_s[0] + key * a.vp_s[1] : v + b * a.v_s[0] + hk * a.v_s[1] + j * a.v_s[2];
  float kr[E], vr[E], qr[E], gr[E], dkr[E] = {}, dvr[E] = {};
  load_row<T, E>(kq, a.D, lane, kr);
  load_row<T, E>(vq, a.D, lane, vr);
  const int group = a.H / a.Hkv;
  int i0 = 0;
  if (!prefix) {
    const int lo = a.kv_start ? max(0, a.kv_start[b]) : 0;
    i0 = j < lo ? a.L : (a.causal ? max(0, j - (a.S - a.L)) : 0);  // queries that see own key j
  }
  for (int h = hk * group; h < (hk + 1) * group; ++h)
    for (int i = i0; i < a.L; ++i) {
      const int64_t row = (int64_t(b) * a.H + h) * a.L + i;
      const float ls = lse[row];
      if (ls == kNegInf) continue;
      load_row<T, E>(q + b * a.q_s[0] + h * a.q_s[1] + i * a.q_s[2], a.D, lane, qr);
      load_row<T, E>(go + row * a.D, a.D, lane, gr);
      const float p = __expf(a.scale * dot<E>(qr, kr) - ls), ds = p * (dot<E>(gr, vr) - delta[row]);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        dvr[e] += p * gr[e];
        dkr[e] += ds * qr[e];
      }
    }
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d = lane + 32 * e;
    if (d >= a.D) continue;
    if (prefix) {
      atomicAdd(dkp + (int64_t(hk) * a.P + key) * a.D + d, a.scale * dkr[e]);
      atomicAdd(dvp + (int64_t(hk) * a.P + key) * a.D + d, dvr[e]);
    } else {
      const int64_t o = ((int64_t(b) * a.Hkv + hk) * a.S + j) * a.D + d;
      dk[o] = Half<T>::from_float(a.scale * dkr[e]);
      dv[o] = Half<T>::from_float(dvr[e]);
    }
  }
}

int row_blocks(const AttnArgs& a) { return int((int64_t(a.B) * a.H * a.L + kWarps - 1) / kWarps); }

template <typename T, int E>
cudaError_t forward(const AttnArgs& a, const T* q, const T* k, const T* v, const T* kp, const T* vp, T* out,
                    float* lse, float* scratch, int splits, cudaStream_t stream) {
  const int64_t rows = int64_t(a.B) * a.H * a.L;
  const int per = (a.P + a.S + splits - 1) / splits;
  float* part_o = scratch;
  float* part_lse = scratch + int64_t(splits) * rows * a.D;
  attn_fwd_kernel<T, E><<<dim3(row_blocks(a), splits), kWarps * 32, 0, stream>>>(a, q, k, v, kp, vp, part_o,
                                                                                 part_lse, std::max(per, 1));
  CTP_CUDA_RETURN_IF_ERROR();
  attn_merge_kernel<T, E><<<row_blocks(a), kWarps * 32, 0, stream>>>(a, part_o, part_lse, splits, out, lse);
  CTP_CUDA_RETURN_IF_ERROR();
  return cudaSuccess;
}

template <typename T, int E>
cudaError_t backward(const AttnArgs& a, const T* go, const T* q, const T* k, const T* v, const T* kp, const T* vp,
                     const T* out, const float* lse, T* dq, T* dk, T* dv, float* dkp, float* dvp, float* delta,
                     cudaStream_t stream) {
  if (row_blocks(a) > 0) {
    attn_delta_kernel<T, E><<<row_blocks(a), kWarps * 32, 0, stream>>>(a, go, out, delta);
    CTP_CUDA_RETURN_IF_ERROR();
    attn_dq_kernel<T, E><<<row_blocks(a), kWarps * 32, 0, stream>>>(a, go, q, k, v, kp, vp, lse, delta, dq);
    CTP_CUDA_RETURN_IF_ERROR();
  }
  const dim3 grid((a.P + a.S + kWarps - 1) / kWarps, a.Hkv, a.B);
  if (grid.x == 0 || a.B == 0) return cudaSuccess;
  attn_dkdv_kernel<T, E><<<grid, kWarps * 32, 0, stream>>>(a, go, q, k, v, kp, vp, lse, delta, dk, dv, dkp, dvp);
  CTP_CUDA_RETURN_IF_ERROR();
  return cudaSuccess;
}

// D <= 256: lanes hold E = ceil(D/32) elements, E in {1, 2, 4, 8}.
#define CTP_ATTN_DISPATCH_E(D, CALL)      \
  if ((D) <= 32) { constexpr int E = 1; return CALL; }  \
  if ((D) <= 64) { constexpr int E = 2; return CALL; }  \
  if ((D) <= 128) { constexpr int E = 4; return CALL; } \
  { constexpr int E = 8; return CALL; }

template <typename T>
cudaError_t forward_t(const AttnArgs& a, const void* q, const void* k, const void* v, const void* kp, const void* vp,
                      void* out, float* lse, float* scratch, int splits, cudaStream_t s) {
  auto c = [](const void* p) { return static_cast<const T*>(p); };
  CTP_ATTN_DISPATCH_E(a.D, (forward<T, E>(a, c(q), c(k), c(v), c(kp), c(vp), static_cast<T*>(out), lse, scratch,
                                          splits, s)))
}

template <typename T>
cudaError_t backward_t(const AttnArgs& a, const void* go, const void* q, const void* k, const void* v, const void* kp,
                       const void* vp, const void* out, const float* lse, void* dq, void* dk, void* dv, float* dkp,
                       float* dvp, float* delta, cudaStream_t s) {
  auto c = [](const void* p) { return static_cast<const T*>(p); };
  CTP_ATTN_DISPATCH_E(a.D, (backward<T, E>(a, c(go), c(q), c(k), c(v), c(kp), c(vp), c(out), lse, static_cast<T*>(dq),
                                           static_cast<T*>(dk), static_cast<T*>(dv), dkp, dvp, delta, s)))
}

}  // namespace

int prefix_attention_splits(const AttnArgs& a) {
  // About 8 warps per SM in flight, each split walking at least 64 keys.
  const int64_t rows = int64_t(a.B) * a.H * a.L, keys = a.P + a.S;
  const int64_t want = (8 * kWarps * int64_t(num_sms()) + rows - 1) / std::max<int64_t>(rows, 1);
  return int(std::max<int64_t>(1, std::min<int64_t>(want, (keys + 63) / 64)));
}

cudaError_t prefix_attention_forward(DType t, const AttnArgs& a, const void* q, const void* k, const void* v,
                                     const void* kp, const void* vp, void* out, float* lse, float* scratch, int splits,
                                     cudaStream_t stream) {
  if (int64_t(a.B) * a.H * a.L == 0) return cudaSuccess;
  return t == DType::f16 ? forward_t<__half>(a, q, k, v, kp, vp, out, lse, scratch, splits, stream)
                         : forward_t<__nv_bfloat16>(a, q, k, v, kp, vp, out, lse, scratch, splits, stream);
}

cudaError_t prefix_attention_backward(DType t, const AttnArgs& a, const void* grad_out, const void* q, const void* k,
                                      const void* v, const void* kp, const void* vp, const void* out, const float* lse,
                                      void* dq, void* dk, void* dv, float* dkp, float* dvp, float* delta,
                                      cudaStream_t stream) {
  return t == DType::f16
             ? backward_t<__half>(a, grad_out, q, k, v, kp, vp, out, lse, dq, dk, dv, dkp, dvp, delta, stream)
             : backward_t<__nv_bfloat16>(a, grad_out, q, k, v, kp, vp, out, lse, dq, dk, dv, dkp, dvp, delta, stream);
}

}  // namespace ctp_cuda
