// Prompt-prefixed attention, avx512 instantiation: the same loops, vectorized for that target; run only
// when the CPU reports it.
// The whole file (simd wrapper included, so it still inlines): float selects may be if-converted.
#pragma GCC optimize("no-trapping-math")
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
// GCC 12 reports its own _mm512_undefined_* placeholders as (maybe-)uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "simd_avx512.h"
using V = VecAvx512;
#define CTP_ISA_NS avx512
#include "attention_impl.h"
