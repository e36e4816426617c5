// Run-time choice of instruction set for the int4 kernels.
#include <cstring>

#include "int4_kernels.h"

namespace ctp {

void run_serial(int64_t n, void* ctx, TaskFn body) {
  if (n > 0) body(ctx, 0, n);
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
  }
  return false;
}

Isa best_isa() {
  if (isa_supported(Isa::avx512)) return Isa::avx512;
  if (isa_supported(Isa::avx2)) return Isa::avx2;
  return Isa::scalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

bool isa_from_name(const char* name, Isa* out) {
  const Isa all[] = {Isa::scalar, Isa::avx2, Isa::avx512};
  for (Isa isa : all) {
    if (std::strcmp(name, isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

void int4_linear(Isa isa, const Int4View& w, const float* x, int64_t M, const float* bias, float* y,
                 ParallelFn par) {
  switch (isa) {
    case Isa::avx512: return avx512::linear(w, x, M, bias, y, par);
    case Isa::avx2: return avx2::linear(w, x, M, bias, y, par);
    default: return scalar::linear(w, x, M, bias, y, par);
  }
}

void int4_linear_grad_input(Isa isa, const Int4View& w, const float* gy, int64_t M, float* gx,
                            ParallelFn par) {
  switch (isa) {
    case Isa::avx512: return avx512::linear_grad_input(w, gy, M, gx, par);
    case Isa::avx2: return avx2::linear_grad_input(w, gy, M, gx, par);
    default: return scalar::linear_grad_input(w, gy, M, gx, par);
  }
}

}  // namespace ctp
