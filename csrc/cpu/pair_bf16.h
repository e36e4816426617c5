// Two fp32 vectors as one vector of bf16 pairs, for the AVX512_BF16 (qlinear_bf16.h) and AMX
// (qlinear_amx.cpp) compilations; included inside neither's namespace block, after CTP_ISA_NS is defined.
#pragma once
#include <immintrin.h>

namespace ctp {
namespace CTP_ISA_NS {

// Lane i: bf16(lo[i]) | bf16(hi[i]) << 16, rounded to nearest even.
static inline __attribute__((always_inline)) __m512i pair_bf16(__m512 lo, __m512 hi) {
  const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

}  // namespace CTP_ISA_NS
}  // namespace ctp
