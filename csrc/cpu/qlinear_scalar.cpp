// packed-weight linear kernels, scalar instantiation.

#include "simd_scalar.h"
using V = VecScalar;
#define CTP_ISA_NS scalar
#include "qlinear_impl.h"
