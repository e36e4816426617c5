// Run-time choice of instruction set for prompt-prefixed attention.
#include "attention.h"

namespace ctp {

void prefix_attention_fwd(Isa isa, const AttnArgs& a, float* out, float* lse, ParallelFn par) {
  switch (isa) {
    case Isa::amx:  // attention works in fp32: the avx512 kernels
    case Isa::avx512bf16:
    case Isa::avx512: return avx512::prefix_attention_fwd(a, out, lse, par);
    case Isa::avx2: return avx2::prefix_attention_fwd(a, out, lse, par);
    default: return scalar::prefix_attention_fwd(a, out, lse, par);
  }
}

void prefix_attention_bwd(Isa isa, const AttnArgs& a, const float* out, const float* lse, const float* gout,
                          float* dq, float* dk, float* dv, float* dkp_b, float* dvp_b, ParallelFn par) {
  switch (isa) {
    case Isa::amx:
    case Isa::avx512bf16:
    case Isa::avx512: return avx512::prefix_attention_bwd(a, out, lse, gout, dq, dk, dv, dkp_b, dvp_b, par);
    case Isa::avx2: return avx2::prefix_attention_bwd(a, out, lse, gout, dq, dk, dv, dkp_b, dvp_b, par);
    default: return scalar::prefix_attention_bwd(a, out, lse, gout, dq, dk, dv, dkp_b, dvp_b, par);
  }
}

}  // namespace ctp
