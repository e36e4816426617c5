// The bf16-activation GEMMs (qlinear_bf16.h) on AVX-512 with AVX512_BF16. Compiled for that target whatever
// the build flags; run only when the CPU reports it (qlinear_dispatch.cpp). The decoders and tiling come
// from qlinear_impl.h, whose fp32 entry points this compilation leaves out (Isa::avx512bf16 runs avx512's).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c,bmi2,popcnt")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "simd_avx512.h"
using V = VecAvx512;
#define CTP_ISA_NS avx512bf16
#define CTP_BF16_GEMM
#include "qlinear_impl.h"
#include "qlinear_bf16.h"
