// packed-weight linear kernels, avx2 instantiation. Compiled for that target whatever the build flags;
// run only when the CPU reports it (isa.cpp).
#pragma GCC target("avx2,fma,f16c,bmi2,popcnt")
#include "simd_avx2.h"
using V = VecAvx2;
#define CTP_ISA_NS avx2
#include "qlinear_impl.h"
