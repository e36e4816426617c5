// Run-time choice of instruction set for the packed-weight kernels.
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

#include "qlinear.h"

namespace ctp {

void run_serial(int64_t n, void* ctx, TaskFn body) {
  if (n > 0) body(ctx, 0, n);
}

// AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24, 22), and the kernel's permission to use the tile
// data state (Linux arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), asked for once per process.
static bool amx_available() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 24 & 1) || !(d >> 22 & 1)) return false;
#ifdef SYS_arch_prctl
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
    case Isa::avx512bf16: return isa_supported(Isa::avx512) && __builtin_cpu_supports("avx512bf16");
    case Isa::amx: return isa_supported(Isa::avx512bf16) && amx_available();
  }
  return false;
}

Isa best_isa() {
  if (isa_supported(Isa::amx)) return Isa::amx;
  if (isa_supported(Isa::avx512bf16)) return Isa::avx512bf16;
  if (isa_supported(Isa::avx512)) return Isa::avx512;
  if (isa_supported(Isa::avx2)) return Isa::avx2;
  return Isa::scalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::amx: return "amx";
    case Isa::avx512bf16: return "avx512bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

bool isa_from_name(const char* name, Isa* out) {
  const Isa all[] = {Isa::scalar, Isa::avx2, Isa::avx512, Isa::avx512bf16, Isa::amx};
  for (Isa isa : all) {
    if (std::strcmp(name, isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

const char* check_view(const QView& w) {
  if (w.N <= 0 || w.K <= 0) return "out_features and in_features must be positive";
  if (w.group_size <= 0) return "group_size must be positive (or -1 for per channel)";
  if (!w.codes || !w.scales) return "codes and scales are required";
  switch (w.layout) {
    case Layout::dense:
      if (w.bits != 3 && w.bits != 4 && w.bits != 8) return "dense weights have 3, 4 or 8 bits";
      return nullptr;
    case Layout::sparse24:
      if (w.bits != 4) return "2:4 weights have 4-bit codes";
      if (w.K % 4) return "2:4 weights need in_features to be a multiple of 4";
      if (w.group_size % 4) return "2:4 weights need a group size that is a multiple of 4";
      if (w.perm) return "2:4 weights cannot be act-order permuted (the 2:4 pattern is along input columns)";
      return nullptr;
    case Layout::unstructured:
      if (w.bits != 4) return "unstructured sparse weights have 4-bit codes";
      if (!w.masks || !w.offsets) return "unstructured sparse weights need masks and offsets";
      return nullptr;
  }
  return "unknown layout";
}

const char* check_unstructured(const QView& w) {
  switch (best_isa()) {
    case Isa::amx:
    case Isa::avx512bf16:
    case Isa::avx512: return avx512::check_unstructured(w);
    case Isa::avx2: return avx2::check_unstructured(w);
    default: return scalar::check_unstructured(w);
  }
}

void linear(Isa isa, const QView& w, const float* x, int64_t M, const float* bias, float* y, ParallelFn par) {
  switch (isa) {
    case Isa::amx:
      if (amx::usable(w, M)) return amx::linear(w, x, M, bias, y, par);
      return avx512::linear(w, x, M, bias, y, par);
    case Isa::avx512bf16:  // fp32 activations: the avx512 kernels
    case Isa::avx512: return avx512::linear(w, x, M, bias, y, par);
    case Isa::avx2: return avx2::linear(w, x, M, bias, y, par);
    default: return scalar::linear(w, x, M, bias, y, par);
  }
}

void linear_grad_input(Isa isa, const QView& w, const float* gy, int64_t M, float* gx, ParallelFn par) {
  switch (isa) {
    case Isa::amx:
      if (amx::usable(w, M)) return amx::linear_grad_input(w, gy, M, gx, par);
      return avx512::linear_grad_input(w, gy, M, gx, par);
    case Isa::avx512bf16:
    case Isa::avx512: return avx512::linear_grad_input(w, gy, M, gx, par);
    case Isa::avx2: return avx2::linear_grad_input(w, gy, M, gx, par);
    default: return scalar::linear_grad_input(w, gy, M, gx, par);
  }
}

// Isa::amx widens bf16 activations and runs its exact-W tiles (which skip the all-zero lo halves).
bool bf16_gemm(Isa isa, int64_t M) { return isa == Isa::avx512bf16 && M > GEMV_MAX_M; }

void linear_bf16(const QView& w, const uint16_t* x, int64_t M, const float* bias, float* y, ParallelFn par) {
  avx512bf16::linear_bf16(w, x, M, bias, y, par);
}

void linear_grad_input_bf16(const QView& w, const uint16_t* gy, int64_t M, float* gx, ParallelFn par) {
  avx512bf16::linear_grad_input_bf16(w, gy, M, gx, par);
}

}  // namespace ctp
