// y = x W^T on packed int4 weights (dense, 2:4, unstructured) with tensor cores.
//
// W is the mma A operand and x^T the B operand (y^T = W x^T), so one m16n8 tile covers 16 output
// features by 8 rows of x: M = 1..8 wastes nothing on the weight side, which is what the memory-bound
// decode shapes need. Each warp owns one 16-row tile of W and streams its packed words (one 16-byte
// load per lane per step; the layout stores them as ready-made A fragments), dequantizes in registers
// (lop3 + magic number, then one sub and one mul), and multiplies against x staged in shared memory.
//   dense         mma.sync m16n8k16, 64 columns per step
//   2:4           mma.sp m16n8k32 on the compressed fragments + metadata, 128 columns per step
//   unstructured  the tile's kept codes are copied to shared memory and expanded into dense fragment
//                 words in registers (pruned positions get the zero point), then as dense
// Split-K: the K steps are divided over gridDim.y so that small M still fills the GPU; partial sums
// meet in an fp32 workspace (atomicAdd) and a second kernel adds the bias and converts.
#include "common.cuh"

namespace ctp_cuda {
namespace {

constexpr int kWarps = 4;

template <typename T, int MT, Layout L>
__global__ void __launch_bounds__(kWarps * 32) qgemm_fwd_kernel(QWeight w, const T* __restrict__ x, int64_t ldx,
                                                                int M, const T* __restrict__ bias, T* __restrict__ y,
                                                                float* __restrict__ ws, int steps_per_split) {
  constexpr int CK = L == Layout::sparse24 ? 128 : 64;  // columns per step
  constexpr int MR = MT * 8;                           // rows of x per block
  constexpr int LD = CK + 8;                           // padded row: conflict-free B-fragment loads
  __shared__ __align__(16) T xs[MR * LD];
  __shared__ uint32_t stage[kWarps][128];              // unstructured: one tile's code stream per warp (<= 1024 nibbles)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int nt = blockIdx.x * kWarps + warp, ntiles = w.Np() / 16, r0 = nt * 16 + g;
  const int m0 = blockIdx.z * MR, nsteps = w.Kp() / CK;
  const int c0 = blockIdx.y * steps_per_split, c1 = min(nsteps, c0 + steps_per_split);
  float acc[MT][4] = {};
  const bool vec_x = !w.perm && ldx % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  // dense / 2:4: the next step's words (and metadata) are loaded while this step computes
  const uint4* qw = reinterpret_cast<const uint4*>(w.qweight) + int64_t(nt) * nsteps * 32 + lane;
  const uint4* qm = reinterpret_cast<const uint4*>(w.masks) + int64_t(nt) * nsteps * 16 + g * 2 + (lane & 1);
  uint4 q_next{}, e_next{};
  if (L != Layout::unstructured && nt < ntiles && c0 < c1) {
    q_next = qw[int64_t(c0) * 32];
    if (L == Layout::sparse24) e_next = qm[int64_t(c0) * 16];
  }

  for (int c = c0; c < c1; ++c) {
    const uint4 q = q_next, em = e_next;
    if (L != Layout::unstructured && nt < ntiles && c + 1 < c1) {
      q_next = qw[int64_t(c + 1) * 32];
      if (L == Layout::sparse24) e_next = qm[int64_t(c + 1) * 16];
    }
    __syncthreads();
    // stage x[m0.., c*CK..] (gathered through perm); 16-byte loads where rows are aligned and complete
    for (int i = threadIdx.x; i < MR * CK / 8; i += kWarps * 32) {
      const int r = i / (CK / 8), kk = i % (CK / 8) * 8, k = c * CK + kk, m = m0 + r;
      T* dst = xs + r * LD + kk;
      if (vec_x && m < M && k + 8 <= w.K) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(x + int64_t(m) * ldx + k);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e)
          dst[e] = (m < M && k + e < w.K) ? x[int64_t(m) * ldx + (w.perm ? w.perm[k + e] : k + e)] : T(0.f);
      }
    }
    __syncthreads();
    if (nt >= ntiles) continue;
    if constexpr (L == Layout::sparse24) {
      const uint32_t words[4] = {q.x, q.y, q.z, q.w}, meta[4] = {em.x, em.y, em.z, em.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t a[4];
        dequant<T>(words[j], row_q<T>(w, group_of(w, c * CK + j * 32), r0), a);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const T* xr = xs + (mt * 8 + g) * LD + j * 32 + 2 * t;
          const uint32_t b[4] = {*reinterpret_cast<const uint32_t*>(xr), *reinterpret_cast<const uint32_t*>(xr + 8),
                                 *reinterpret_cast<const uint32_t*>(xr + 16), *reinterpret_cast<const uint32_t*>(xr + 24)};
          mma_sp_16832<T>(acc[mt], a, b, meta[j]);
        }
      }
    } else {
      uint32_t words[4];
      if constexpr (L == Layout::dense) {
        words[0] = q.x, words[1] = q.y, words[2] = q.z, words[3] = q.w;
      } else {
        expand_unstructured(w, nt, c, nsteps, lane, r0, stage[warp], words);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t a[4];
        dequant<T>(words[j], row_q<T>(w, group_of(w, c * CK + j * 16), r0), a);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const T* xr = xs + (mt * 8 + g) * LD + j * 16 + 2 * t;
          mma_16816<T>(acc[mt], a, *reinterpret_cast<const uint32_t*>(xr), *reinterpret_cast<const uint32_t*>(xr + 8));
        }
      }
    }
  }
  if (nt >= ntiles) return;
  // accumulator (i): row (feature) g + 8*(i/2), column (x row) 2t + i%2
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = r0 + 8 * (i / 2), m = m0 + mt * 8 + 2 * t + (i % 2);
      if (n >= w.N || m >= M) continue;
      if (ws) {
        atomicAdd(ws + int64_t(m) * w.N + n, acc[mt][i]);
      } else {
        y[int64_t(m) * w.N + n] = Half<T>::from_float(acc[mt][i] + (bias ? to_float(bias[n]) : 0.f));
      }
    }
}

template <typename T>
__global__ void finish_kernel(const float* __restrict__ ws, const T* __restrict__ bias, T* __restrict__ y, int64_t M,
                              int N) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * N; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = Half<T>::from_float(ws[i] + (bias ? to_float(bias[i % N]) : 0.f));
}

template <typename T, int MT, Layout L>
cudaError_t launch(const QWeight& w, const T* x, int64_t ldx, int M, const T* bias, T* y, float* ws,
                   cudaStream_t stream) {
  const int ntiles = w.Np() / 16, nsteps = w.Kp() / w.chunk_k();
  const int bn = (ntiles + kWarps - 1) / kWarps, bm = (M + MT * 8 - 1) / (MT * 8);
  // split K until there are about 4 blocks per SM (each split keeps at least one step)
  int splits = std::min(nsteps, std::max(1, (4 * num_sms() + bn * bm - 1) / (bn * bm)));
  const int per = (nsteps + splits - 1) / splits;
  splits = (nsteps + per - 1) / per;
  float* partial = splits > 1 ? ws : nullptr;
  if (partial) {
    cudaError_t e = cudaMemsetAsync(partial, 0, sizeof(float) * size_t(M) * w.N, stream);
    if (e != cudaSuccess) return e;
  }
  qgemm_fwd_kernel<T, MT, L><<<dim3(bn, splits, bm), kWarps * 32, 0, stream>>>(w, x, ldx, M, bias, y, partial, per);
  CTP_CUDA_RETURN_IF_ERROR();
  if (partial) {
    const int64_t total = int64_t(M) * w.N;
    const int blocks = int(std::min<int64_t>((total + 255) / 256, 8 * num_sms()));
    finish_kernel<T><<<blocks, 256, 0, stream>>>(partial, bias, y, M, w.N);
    CTP_CUDA_RETURN_IF_ERROR();
  }
  return cudaSuccess;
}

template <typename T, Layout L>
cudaError_t dispatch_m(const QWeight& w, const T* x, int64_t ldx, int64_t M, const T* bias, T* y, float* ws,
                       cudaStream_t stream) {
  // The M tile follows M (1..8 rows: one n8 tile; up to 64 rows per block beyond), and grid.z
  // covers large M in slices of at most 65535 * 64 rows.
  if (M <= 8) return launch<T, 1, L>(w, x, ldx, int(M), bias, y, ws, stream);
  if (M <= 16) return launch<T, 2, L>(w, x, ldx, int(M), bias, y, ws, stream);
  if (M <= 32) return launch<T, 4, L>(w, x, ldx, int(M), bias, y, ws, stream);
  const int64_t slice = int64_t(65535) * 64;
  for (int64_t m0 = 0; m0 < M; m0 += slice) {
    const int rows = int(std::min(slice, M - m0));
    cudaError_t e = launch<T, 8, L>(w, x + m0 * ldx, ldx, rows, bias, y + m0 * w.N, ws, stream);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t dispatch_layout(const QWeight& w, const void* x, int64_t ldx, int64_t M, const void* bias, void* y,
                            float* ws, cudaStream_t stream) {
  auto xp = static_cast<const T*>(x);
  auto bp = static_cast<const T*>(bias);
  auto yp = static_cast<T*>(y);
  switch (w.layout) {
    case Layout::dense: return dispatch_m<T, Layout::dense>(w, xp, ldx, M, bp, yp, ws, stream);
    case Layout::sparse24: return dispatch_m<T, Layout::sparse24>(w, xp, ldx, M, bp, yp, ws, stream);
    default: return dispatch_m<T, Layout::unstructured>(w, xp, ldx, M, bp, yp, ws, stream);
  }
}

}  // namespace

cudaError_t qlinear_forward(DType t, const QWeight& w, const void* x, int64_t ldx, int64_t M, const void* bias,
                            void* y, float* workspace, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  return t == DType::f16 ? dispatch_layout<__half>(w, x, ldx, M, bias, y, workspace, stream)
                         : dispatch_layout<__nv_bfloat16>(w, x, ldx, M, bias, y, workspace, stream);
}

}  // namespace ctp_cuda
