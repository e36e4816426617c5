// Device helpers shared by the CUDA kernels: 16-bit types, tensor-core mma wrappers, in-register
// int4 dequantization, scale loads and warp reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels.h"

namespace ctp_cuda {

#define CTP_CUDA_RETURN_IF_ERROR() \
  do {                             \
    cudaError_t e_ = cudaGetLastError(); \
    if (e_ != cudaSuccess) return e_;    \
  } while (0)

// ---------------------------------------------------------------- 16-bit activation types
template <typename T> struct Half;
template <> struct Half<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both halves: 1024 + q for a nibble q
  static constexpr float kMagicValue = 1024.f;
  static __device__ __forceinline__ __half from_float(float f) { return __float2half_rn(f); }
  static __device__ __forceinline__ float to_float(__half h) { return __half2float(h); }
  static __device__ __forceinline__ __half2 pair(float f) { return __float2half2_rn(f); }
};
template <> struct Half<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 (bf16 has 7 mantissa bits): 128 + q
  static constexpr float kMagicValue = 128.f;
  static __device__ __forceinline__ __nv_bfloat16 from_float(float f) { return __float2bfloat16_rn(f); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 h) { return __bfloat162float(h); }
  static __device__ __forceinline__ __nv_bfloat162 pair(float f) { return __float2bfloat162_rn(f); }
};

template <typename V> __device__ __forceinline__ uint32_t as_u32(V v) { return *reinterpret_cast<uint32_t*>(&v); }
template <typename V> __device__ __forceinline__ V from_u32(uint32_t u) { return *reinterpret_cast<V*>(&u); }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// ---------------------------------------------------------------- tensor cores
// D = A B + D, m16n8k16, A row-major 16x16 (4 regs), B 16x8 (2 regs), fp32 accumulators.
template <typename T> __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                                 uint32_t b1);
template <> __device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                               uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                                      uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D = A B + D with A 2:4 sparse (mma.sp m16n8k32): A is the compressed 16x16 fragment, e the metadata
// register, sparsity selector 0 (lanes 4r and 4r+1 of each quad supply it; see cuda_layout.py).
template <typename T> __device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4],
                                                                    const uint32_t (&b)[4], uint32_t e);
template <> __device__ __forceinline__ void mma_sp_16832<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                                  const uint32_t (&b)[4], uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}
template <> __device__ __forceinline__ void mma_sp_16832<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                                         const uint32_t (&b)[4], uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

// ---------------------------------------------------------------- int4 dequantization in registers
// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// Per-row dequantization constants of a lane's two rows (g and g+8): zz = magic + zero point, s = scale.
template <typename T> struct RowQ {
  typename Half<T>::T2 zz0, zz8, s0, s8;
};

__device__ __forceinline__ float load_scale(const void* p, ScaleType st, int64_t i) {
  switch (st) {
    case ScaleType::f16: return __half2float(static_cast<const __half*>(p)[i]);
    case ScaleType::bf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Constants for rows r0 and r0+8 in group g.
template <typename T> __device__ __forceinline__ RowQ<T> row_q(const QWeight& w, int g, int r0) {
  const int64_t i = int64_t(g) * w.Np() + r0;
  const float z0 = w.zeros ? float(w.zeros[i]) : 8.f, z8 = w.zeros ? float(w.zeros[i + 8]) : 8.f;
  RowQ<T> q;
  q.zz0 = Half<T>::pair(Half<T>::kMagicValue + z0);  // small integers: exact in fp16 and bf16
  q.zz8 = Half<T>::pair(Half<T>::kMagicValue + z8);
  q.s0 = Half<T>::pair(load_scale(w.scales, w.scale_type, i));
  q.s8 = Half<T>::pair(load_scale(w.scales, w.scale_type, i + 8));
  return q;
}

// A fragment word (8 nibbles, see cuda_layout.py) -> the 4 A registers: register p holds
// (nibble p, nibble p+4); registers 0 and 2 are row g, 1 and 3 row g+8. (magic + q) - (magic + z) is
// exact, so the only rounding is the one multiply by the scale.
template <typename T> __device__ __forceinline__ void dequant(uint32_t word, const RowQ<T>& q, uint32_t (&a)[4]) {
  using T2 = typename Half<T>::T2;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const T2 h = from_u32<T2>(lop3_and_or(word >> (4 * p), 0x000f000fu, Half<T>::kMagic));
    a[p] = as_u32(__hmul2(__hsub2(h, (p & 1) ? q.zz8 : q.zz0), (p & 1) ? q.s8 : q.s0));
  }
}

// Every nibble of a lane's word at its rows' zero points: even nibbles are row g, odd ones row g+8.
__device__ __forceinline__ uint32_t zero_word(const QWeight& w, int g, int r0) {
  if (!w.zeros) return 0x88888888u;
  const int64_t i = int64_t(g) * w.Np() + r0;
  return uint32_t(w.zeros[i]) * 0x01010101u | uint32_t(w.zeros[i + 8]) * 0x10101010u;
}

// Group of the k-tile starting at column k0 (tiles never straddle groups: group sizes are multiples of
// 32, or one group per row; tiles past K clamp to the last group).
__device__ __forceinline__ int group_of(const QWeight& w, int k0) { return min(k0 / w.group_size, w.G - 1); }

// Unstructured: expand lane's 4 fragment words of tile (nt, c) from the code stream. `stage` is this
// warp's scratch of 128 words in shared memory (a 16x64 tile keeps at most 1024 codes).
__device__ __forceinline__ void expand_unstructured(const QWeight& w, int nt, int c, int nchunks, int lane, int r0,
                                                    uint32_t* stage, uint32_t (&words)[4]) {
  const int64_t tile = int64_t(nt) * nchunks + c;
  const uint32_t m = w.masks[tile * 32 + lane];
  const int start = w.offsets[tile], nwords = w.offsets[tile + 1] - start;
  __syncwarp();
  for (int i = lane; i < nwords; i += 32) stage[i] = w.qweight[start + i];
  // exclusive prefix sum of the lanes' kept counts = where each lane's codes start in the tile
  const int cnt = __popc(m);
  int incl = cnt;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int o = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += o;
  }
  int pos = incl - cnt;
  __syncwarp();
#pragma unroll
  for (int j = 0; j < 4; ++j) words[j] = zero_word(w, group_of(w, (c * 4 + j) * 16), r0);
  for (uint32_t left = m; left; left &= left - 1, ++pos) {
    const int b = __ffs(left) - 1, shift = 4 * (b & 7);
    const uint32_t code = (stage[pos >> 3] >> (4 * (pos & 7))) & 15u;
    words[b >> 3] = (words[b >> 3] & ~(15u << shift)) | (code << shift);
  }
}

// ---------------------------------------------------------------- reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

inline int num_sms() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 108;
  return n;
}

}  // namespace ctp_cuda
