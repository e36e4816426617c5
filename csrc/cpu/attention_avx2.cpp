// Prompt-prefixed attention, avx2 instantiation: the same loops, vectorized for that target; run only
// when the CPU reports it.
// The whole file (simd wrapper included, so it still inlines): float selects may be if-converted.
#pragma GCC optimize("no-trapping-math")
#pragma GCC target("avx2,fma,f16c")
#include "simd_avx2.h"
using V = VecAvx2;
#define CTP_ISA_NS avx2
#include "attention_impl.h"
