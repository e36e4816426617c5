// CUDA kernels of ctp_fast: plain CUDA taking raw pointers, sizes and a stream; no torch headers.
// The packed layouts are described (and defined by a pure-torch reference unpack) in
// ctp_fast/formats/cuda_layout.py; csrc/bindings_cuda.cpp checks every argument before calling these.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#define CTP_HD __host__ __device__
#else
#define CTP_HD
#endif

namespace ctp_cuda {

enum class DType : int { f16 = 0, bf16 = 1 };                 // activations and outputs
enum class ScaleType : int { f32 = 0, f16 = 1, bf16 = 2 };    // stored scales
enum class Layout : int { dense = 0, sparse24 = 1, unstructured = 2 };

// A packed 4-bit weight W [N, K] in its CUDA layout.
struct QWeight {
  Layout layout;
  const uint32_t* qweight;  // dense / 2:4: per-lane fragment words; unstructured: the code stream
  const uint32_t* masks;    // 2:4: mma.sp metadata; unstructured: per-lane kept masks; dense: null
  const int32_t* offsets;   // unstructured: word where each 16x64 tile starts (+ end); else null
  const void* scales;       // [G, Np]
  ScaleType scale_type;
  const uint8_t* zeros;     // [G, Np] zero points, null: symmetric (8)
  const int64_t* perm;      // [K] act-order (packed column k holds input column perm[k]), or null
  int N, K, group_size, G;  // group_size == K for per-channel

  CTP_HD int Np() const { return (N + 15) / 16 * 16; }
  CTP_HD int chunk_k() const { return layout == Layout::sparse24 ? 128 : 64; }
  CTP_HD int Kp() const { return (K + chunk_k() - 1) / chunk_k() * chunk_k(); }
};

// fp32 scratch the GEMMs need (split-K / split-N partial sums): M*N floats forward, M*K backward.
inline size_t qlinear_workspace_floats(const QWeight& w, int64_t M) { return size_t(M) * w.N; }
inline size_t qlinear_grad_workspace_floats(const QWeight& w, int64_t M) { return size_t(M) * w.K; }

// y[M, N] = x[M, K] W^T (+ bias[N]); x rows ldx elements apart (last dim contiguous), y contiguous,
// bias in the activation type or null.
cudaError_t qlinear_forward(DType t, const QWeight& w, const void* x, int64_t ldx, int64_t M, const void* bias,
                            void* y, float* workspace, cudaStream_t stream);
// gx[M, K] = gy[M, N] W; gy rows ldg apart, gx contiguous.
cudaError_t qlinear_grad_input(DType t, const QWeight& w, const void* gy, int64_t ldg, int64_t M, void* gx,
                               float* workspace, cudaStream_t stream);

// Prompt-prefixed attention: q [B,H,L,D]; k, v [B,Hkv,S,D]; k_prefix, v_prefix [Hkv,P,D] shared by every
// sequence. Query i sits at own position S-L+i and attends to every prefix key, and to own keys j with
// j >= kv_start[b] (if given) and, when causal, j <= S-L+i. Strides in elements; the last dim is contiguous.
struct AttnArgs {
  int B, H, Hkv, L, S, P, D;
  int64_t q_s[3], k_s[3], v_s[3];  // strides of b, h, position
  int64_t kp_s[2], vp_s[2];        // strides of h, position
  const int32_t* kv_start;         // [B] or null
  bool causal;
  float scale;
};

// Number of key splits the forward uses (the caller allocates splits * B*H*L*(D+1) floats of scratch).
int prefix_attention_splits(const AttnArgs& a);
// out [B,H,L,D] contiguous (activation type), lse [B,H,L] fp32.
cudaError_t prefix_attention_forward(DType t, const AttnArgs& a, const void* q, const void* k, const void* v,
                                     const void* kp, const void* vp, void* out, float* lse, float* scratch,
                                     int splits, cudaStream_t stream);
// grad_out and out contiguous [B,H,L,D]; dq [B,H,L,D], dk, dv [B,Hkv,S,D] contiguous in the activation type;
// dkp, dvp [Hkv,P,D] fp32, zeroed by the caller, summed over the batch; delta: B*H*L floats of scratch.
cudaError_t prefix_attention_backward(DType t, const AttnArgs& a, const void* grad_out, const void* q, const void* k,
                                      const void* v, const void* kp, const void* vp, const void* out,
                                      const float* lse, void* dq, void* dk, void* dv, float* dkp, float* dvp,
                                      float* delta, cudaStream_t stream);

}  // namespace ctp_cuda
