// Prompt-prefixed attention, baseline instantiation (the plain C++ path).
// The whole file (simd wrapper included, so it still inlines): float selects may be if-converted.
#pragma GCC optimize("no-trapping-math")
#include "simd_scalar.h"
using V = VecScalar;
#define CTP_ISA_NS scalar
#include "attention_impl.h"
