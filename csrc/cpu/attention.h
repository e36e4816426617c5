// Prompt-prefixed attention on the CPU: plain C++ on raw fp32 pointers (no torch headers).
//
// Queries q [B, H, L, D] attend to a prompt's keys/values kp, vp [Hkv, P, D] (stored once, shared by every
// sequence) followed by their own keys/values k, v [B, Hkv, S, D] (S >= L: a KV cache may precede the
// current L positions; query i sits at own position S - L + i). Head h reads kv head h / (H / Hkv).
// Every query sees all P prompt keys, and own keys j with
//     j <= S - L + i      (when causal)      and      j >= kv_start[b]   (when kv_start: left padding).
// Scores are scale * q.k; out = softmax(scores) v; lse = log(sum(exp(scores))) (-inf for a query that sees
// no key at all, whose output is 0). The prompt and the own part are two segments of one online softmax:
// the concatenation [prompt; own] is never built.
#pragma once
#include <cstdint>

#include "qlinear.h"  // Isa, ParallelFn

namespace ctp {

struct AttnArgs {
  int64_t B, H, Hkv, L, S, P, D;
  const float* q;                  // [B, H, L, D], strides below (last dimension contiguous)
  const float* k;                  // [B, Hkv, S, D]
  const float* v;                  // [B, Hkv, S, D]
  int64_t qs[3], ks[3], vs[3];     // strides of dims 0..2 in elements
  const float* kp;                 // [Hkv, P, D] contiguous (may be null when P == 0)
  const float* vp;
  const int64_t* kv_start;         // [B] or null
  bool causal;
  float scale;
};

// out [B, H, L, D] and lse [B, H, L], contiguous.
void prefix_attention_fwd(Isa isa, const AttnArgs& a, float* out, float* lse, ParallelFn par = run_serial);

// From out, lse and gout ([B, H, L, D] contiguous): dq [B, H, L, D], dk, dv [B, Hkv, S, D] and the prompt's
// gradients per sequence dkp_b, dvp_b [B, Hkv, P, D] (the caller sums them over B), all contiguous and fully
// written (no need to zero them).
void prefix_attention_bwd(Isa isa, const AttnArgs& a, const float* out, const float* lse, const float* gout,
                          float* dq, float* dk, float* dv, float* dkp_b, float* dvp_b, ParallelFn par = run_serial);

#define CTP_DECLARE_ATTN(NS)                                                                               \
  namespace NS {                                                                                           \
  void prefix_attention_fwd(const AttnArgs& a, float* out, float* lse, ParallelFn par);                   \
  void prefix_attention_bwd(const AttnArgs& a, const float* out, const float* lse, const float* gout,      \
                            float* dq, float* dk, float* dv, float* dkp_b, float* dvp_b, ParallelFn par); \
  }
CTP_DECLARE_ATTN(scalar)
CTP_DECLARE_ATTN(avx2)
CTP_DECLARE_ATTN(avx512)
#undef CTP_DECLARE_ATTN

}  // namespace ctp
