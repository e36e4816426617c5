// packed-weight linear kernels, avx512 instantiation. Compiled for that target whatever the build flags;
// run only when the CPU reports it (isa.cpp).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,bmi2,popcnt")
// GCC 12 reports its own _mm512_undefined_* placeholders as (maybe-)uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "simd_avx512.h"
using V = VecAvx512;
#define CTP_ISA_NS avx512
#include "qlinear_impl.h"
