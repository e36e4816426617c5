// grad_x = grad_y W on packed int4 weights (dense, 2:4, unstructured), from the same CUDA layout as
// the forward (csrc/cuda/qgemm.cu).
//
// Here W^T is the mma A operand (gx^T = W^T gy^T): a 16x16 A tile is a transposed 16x16 block of W,
// which the forward's fragment words do not give directly. So each warp decodes its 16-row x 64-column
// tile of W into shared memory (dequantized, pruned entries 0; 2:4 positions from the mma.sp metadata)
// and reads the transposed fragments from there, then runs dense mma.sync m16n8k16 against gy^T.
// A block owns 64 columns of K and up to 32 rows of gy; the N reduction is split over the block's
// warps and gridDim.y, meeting in an fp32 workspace (atomicAdd, scattered through perm) that a second
// kernel converts.
#include "common.cuh"

namespace ctp_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int CK = 64;          // columns of K per block
constexpr int LDW = CK + 8;     // padded shared rows

// Decode W[16 rows of tile nt, columns c*64 .. c*64+63] into wt[16][LDW] (this warp's scratch).
template <typename T, Layout L>
__device__ void decode_tile(const QWeight& w, int nt, int c, int lane, T* wt, uint32_t* stage) {
  using T2 = typename Half<T>::T2;
  const int g = lane / 4, t = lane % 4, r0 = nt * 16 + g;
  if constexpr (L == Layout::sparse24) {
    // The 2:4 layout steps by 128 columns: this 64-column block is half h of step c/2.
    const int step = c / 2, h = c % 2, nsteps = w.Kp() / 128;
    const int64_t tile = int64_t(nt) * nsteps + step;
    for (int i = lane; i < 16 * CK / 2; i += 32) reinterpret_cast<uint32_t*>(wt)[(i / (CK / 2)) * (LDW / 2) + i % (CK / 2)] = 0;
    __syncwarp();
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const int j = 2 * h + jj;  // 32-column tile within the step
      uint32_t a[4];
      dequant<T>(w.qweight[(tile * 32 + lane) * 4 + j], row_q<T>(w, group_of(w, step * 128 + j * 32), r0), a);
#pragma unroll
      for (int p = 0; p < 4; ++p) {  // register p: row g + 8*(p&1), chunk t + 4*(p>>1), slots 0 and 1
        const int row = g + 8 * (p & 1), chunk = t + 4 * (p >> 1);
        const uint32_t e = w.masks[(tile * 16 + g * 2 + (p >> 1)) * 4 + j];
        const uint32_t nib = ((p & 1) ? e >> 16 : e & 0xffffu) >> (4 * t) & 15u;
        const T2 v = from_u32<T2>(a[p]);
        T* dst = wt + row * LDW + jj * 32 + chunk * 4;
        dst[nib & 3] = v.x;
        dst[nib >> 2] = v.y;
      }
    }
  } else {
    const int nsteps = w.Kp() / CK;
    uint32_t words[4];
    if constexpr (L == Layout::dense) {
      const uint4 q = reinterpret_cast<const uint4*>(w.qweight)[(int64_t(nt) * nsteps + c) * 32 + lane];
      words[0] = q.x, words[1] = q.y, words[2] = q.z, words[3] = q.w;
    } else {
      expand_unstructured(w, nt, c, nsteps, lane, r0, stage, words);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t a[4];
      dequant<T>(words[j], row_q<T>(w, group_of(w, c * CK + j * 16), r0), a);
#pragma unroll
      for (int p = 0; p < 4; ++p)  // register p: row g + 8*(p&1), columns 2t + 8*(p>>1) + {0, 1}
        *reinterpret_cast<uint32_t*>(wt + (g + 8 * (p & 1)) * LDW + j * 16 + 2 * t + 8 * (p >> 1)) = a[p];
    }
  }
  __syncwarp();
}

template <typename T, int MT, Layout L>
__global__ void __launch_bounds__(kWarps * 32) qgemm_grad_kernel(QWeight w, const T* __restrict__ gy, int64_t ldg,
                                                                 int M, float* __restrict__ ws, int tiles_per_split) {
  constexpr int MR = MT * 8;
  __shared__ __align__(16) T wts[kWarps][16 * LDW];
  __shared__ __align__(16) T gys[kWarps][MR * 24];  // gy[m0.., n tile] per warp, rows padded to 24
  __shared__ uint32_t stage[kWarps][128];  // unstructured: one tile's code stream (<= 1024 nibbles)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int c = blockIdx.x, m0 = blockIdx.z * MR, ntiles = w.Np() / 16;
  const int n_begin = blockIdx.y * tiles_per_split, n_end = min(ntiles, n_begin + tiles_per_split);
  T* wt = wts[warp];
  T* gs = gys[warp];
  float acc[4][MT][4] = {};

  for (int nt = n_begin + warp; nt < n_end; nt += kWarps) {
    decode_tile<T, L>(w, nt, c, lane, wt, stage[warp]);
    for (int i = lane; i < MR * 16; i += 32) {
      const int r = i / 16, n = nt * 16 + i % 16, m = m0 + r;
      gs[r * 24 + i % 16] = (m < M && n < w.N) ? gy[int64_t(m) * ldg + n] : T(0.f);
    }
    __syncwarp();
#pragma unroll
    for (int kt = 0; kt < 4; ++kt) {
      // A = W^T tile: element (row k, col n) = wt[n][kt*16 + k]; a0,a1: (g, 2t..2t+1), a2,a3: (g+8, ..),
      // a4..a7: columns + 8.
      uint32_t a[4];
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const int k = kt * 16 + g + 8 * (p & 1), n = 2 * t + 8 * (p >> 1);
        typename Half<T>::T2 v;
        v.x = wt[n * LDW + k];
        v.y = wt[(n + 1) * LDW + k];
        a[p] = as_u32(v);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {  // B = gy^T: (row n, col m) = gy[m][n]
        const T* gr = gs + (mt * 8 + g) * 24 + 2 * t;
        mma_16816<T>(acc[kt][mt], a, *reinterpret_cast<const uint32_t*>(gr), *reinterpret_cast<const uint32_t*>(gr + 8));
      }
    }
    __syncwarp();
  }
#pragma unroll
  for (int kt = 0; kt < 4; ++kt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int k = c * CK + kt * 16 + g + 8 * (i / 2), m = m0 + mt * 8 + 2 * t + (i % 2);
        if (k < w.K && m < M && acc[kt][mt][i] != 0.f)
          atomicAdd(ws + int64_t(m) * w.K + (w.perm ? w.perm[k] : k), acc[kt][mt][i]);
      }
}

template <typename T>
__global__ void convert_kernel(const float* __restrict__ ws, T* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = Half<T>::from_float(ws[i]);
}

template <typename T, int MT, Layout L>
cudaError_t launch(const QWeight& w, const T* gy, int64_t ldg, int M, float* ws, cudaStream_t stream) {
  const int ntiles = w.Np() / 16, bk = (w.K + CK - 1) / CK, bm = (M + MT * 8 - 1) / (MT * 8);
  int splits = std::min((ntiles + kWarps - 1) / kWarps, std::max(1, (4 * num_sms() + bk * bm - 1) / (bk * bm)));
  const int per = (ntiles + splits - 1) / splits;
  splits = (ntiles + per - 1) / per;
  qgemm_grad_kernel<T, MT, L><<<dim3(bk, splits, bm), kWarps * 32, 0, stream>>>(w, gy, ldg, M, ws, per);
  CTP_CUDA_RETURN_IF_ERROR();
  return cudaSuccess;
}

template <typename T, Layout L>
cudaError_t run(const QWeight& w, const T* gy, int64_t ldg, int64_t M, T* gx, float* ws, cudaStream_t stream) {
  cudaError_t e = cudaMemsetAsync(ws, 0, sizeof(float) * size_t(M) * w.K, stream);
  if (e != cudaSuccess) return e;
  if (M <= 8) {
    e = launch<T, 1, L>(w, gy, ldg, int(M), ws, stream);
  } else if (M <= 16) {
    e = launch<T, 2, L>(w, gy, ldg, int(M), ws, stream);
  } else {
    const int64_t slice = int64_t(65535) * 32;
    for (int64_t m0 = 0; m0 < M && e == cudaSuccess; m0 += slice)
      e = launch<T, 4, L>(w, gy + m0 * ldg, ldg, int(std::min(slice, M - m0)), ws + m0 * w.K, stream);
  }
  if (e != cudaSuccess) return e;
  const int64_t n = M * w.K;
  convert_kernel<T><<<int(std::min<int64_t>((n + 255) / 256, 8 * num_sms())), 256, 0, stream>>>(ws, gx, n);
  CTP_CUDA_RETURN_IF_ERROR();
  return cudaSuccess;
}

template <typename T>
cudaError_t dispatch(const QWeight& w, const void* gy, int64_t ldg, int64_t M, void* gx, float* ws,
                     cudaStream_t stream) {
  auto g = static_cast<const T*>(gy);
  auto o = static_cast<T*>(gx);
  switch (w.layout) {
    case Layout::dense: return run<T, Layout::dense>(w, g, ldg, M, o, ws, stream);
    case Layout::sparse24: return run<T, Layout::sparse24>(w, g, ldg, M, o, ws, stream);
    default: return run<T, Layout::unstructured>(w, g, ldg, M, o, ws, stream);
  }
}

}  // namespace

cudaError_t qlinear_grad_input(DType t, const QWeight& w, const void* gy, int64_t ldg, int64_t M, void* gx,
                               float* workspace, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  return t == DType::f16 ? dispatch<__half>(w, gy, ldg, M, gx, workspace, stream)
                         : dispatch<__nv_bfloat16>(w, gy, ldg, M, gx, workspace, stream);
}

}  // namespace ctp_cuda
