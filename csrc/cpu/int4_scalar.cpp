// int4 kernels, scalar instantiation.

#include "simd_scalar.h"
using V = VecScalar;
#define CTP_ISA_NS scalar
#include "int4_impl.h"
