// The one place where torch meets the kernels: argument checks with clear messages, dtype
// handling, thread pool, op registration (TORCH_LIBRARY) and the ctp_fast._C module.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "cpu/int4_kernels.h"

namespace {

using ctp::Isa;

// -1: not chosen yet (resolved from CTP_FAST_ISA on first use).
std::atomic<int> g_isa{-1};

Isa resolve_isa(const std::string& name, const char* origin) {
  Isa isa;
  TORCH_CHECK(ctp::isa_from_name(name.c_str(), &isa), origin, "='", name,
              "' is not an instruction set ctp_fast knows; expected one of scalar, avx2, avx512");
  TORCH_CHECK(ctp::isa_supported(isa), origin, "='", name, "' but this CPU does not support ", name);
  return isa;
}

Isa current_isa() {
  int v = g_isa.load();
  if (v < 0) {
    const char* env = std::getenv("CTP_FAST_ISA");
    Isa isa = (env && *env) ? resolve_isa(env, "CTP_FAST_ISA") : ctp::best_isa();
    g_isa.store(static_cast<int>(isa));
    return isa;
  }
  return static_cast<Isa>(v);
}

void set_isa(const std::string& name) {
  g_isa.store(static_cast<int>(resolve_isa(name, "set_isa(name)")));
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512})
    if (ctp::isa_supported(isa)) out.push_back(ctp::isa_name(isa));
  return out;
}

void parallel_torch(int64_t n, void* ctx, ctp::TaskFn body) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { body(ctx, begin, end); });
}

// Checks the packed weight and returns a view of it. N is the number of output features.
ctp::Int4View int4_view(const at::Tensor& qweight, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& perm,
                        int64_t N, int64_t group_size) {
  TORCH_CHECK(qweight.device().is_cpu(), "qweight: expected a CPU tensor, got ", qweight.device());
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "qweight: expected uint8 packed codes, got ",
              qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 3 && qweight.size(2) == 16,
              "qweight: expected shape [ceil(N / 32), K, 16], got ", qweight.sizes());
  TORCH_CHECK(qweight.is_contiguous(), "qweight: expected a contiguous tensor");
  TORCH_CHECK(N > 0 && (N + 31) / 32 == qweight.size(0), "out_features=", N,
              " does not match qweight with ", qweight.size(0), " blocks of 32 rows");
  const int64_t K = qweight.size(1);
  TORCH_CHECK(K > 0, "qweight: in_features must be positive, got ", K);
  if (group_size == -1) group_size = K;
  TORCH_CHECK(group_size > 0, "group_size: expected a positive group size or -1 (per channel), got ",
              group_size);
  const int64_t G = (K + group_size - 1) / group_size;
  ctp::ScaleType st;
  switch (scales.scalar_type()) {
    case at::kFloat: st = ctp::ScaleType::f32; break;
    case at::kHalf: st = ctp::ScaleType::f16; break;
    case at::kBFloat16: st = ctp::ScaleType::bf16; break;
    default: TORCH_CHECK(false, "scales: expected float32, float16 or bfloat16, got ", scales.scalar_type());
  }
  TORCH_CHECK(scales.device().is_cpu(), "scales: expected a CPU tensor, got ", scales.device());
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == qweight.size(0) && scales.size(1) == G &&
                  scales.size(2) == 32,
              "scales: expected shape [", qweight.size(0), ", ", G, ", 32] for K=", K,
              " and group_size=", group_size, ", got ", scales.sizes());
  TORCH_CHECK(scales.is_contiguous(), "scales: expected a contiguous tensor");
  const uint8_t* zp = nullptr;
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->device().is_cpu(), "zeros: expected a CPU tensor, got ", zeros->device());
    TORCH_CHECK(zeros->scalar_type() == at::kByte, "zeros: expected uint8, got ", zeros->scalar_type());
    TORCH_CHECK(zeros->sizes() == scales.sizes(), "zeros: expected the shape of scales ", scales.sizes(),
                ", got ", zeros->sizes());
    TORCH_CHECK(zeros->is_contiguous(), "zeros: expected a contiguous tensor");
    zp = zeros->data_ptr<uint8_t>();
  }
  const int64_t* pp = nullptr;
  if (perm.has_value()) {
    TORCH_CHECK(perm->device().is_cpu(), "perm: expected a CPU tensor, got ", perm->device());
    TORCH_CHECK(perm->scalar_type() == at::kLong, "perm: expected int64, got ", perm->scalar_type());
    TORCH_CHECK(perm->dim() == 1 && perm->size(0) == K, "perm: expected shape [", K, "], got ",
                perm->sizes());
    TORCH_CHECK(perm->is_contiguous(), "perm: expected a contiguous tensor");
    pp = perm->data_ptr<int64_t>();
    for (int64_t k = 0; k < K; ++k)
      TORCH_CHECK(pp[k] >= 0 && pp[k] < K, "perm: entry ", k, " is ", pp[k], ", outside [0, ", K, ")");
  }
  return ctp::Int4View{qweight.data_ptr<uint8_t>(), scales.data_ptr(), zp, pp, N, K, group_size, st};
}

// Activations: fp32 or bf16 on the CPU, last dim `width`; returns an fp32 contiguous 2-D copy/view.
at::Tensor activations_2d(const at::Tensor& t, const char* name, int64_t width) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              ": expected float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == width, name, ": expected last dimension ", width, ", got shape ",
              t.sizes());
  return t.reshape({-1, width}).to(at::kFloat).contiguous();
}

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
  s.back() = last;
  return s;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& perm,
                       const c10::optional<at::Tensor>& bias, int64_t out_features, int64_t group_size) {
  ctp::Int4View w = int4_view(qweight, scales, zeros, perm, out_features, group_size);
  at::Tensor x2 = activations_2d(x, "x", w.K);
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu(), "bias: expected a CPU tensor, got ", bias->device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.N, "bias: expected shape [", w.N, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->is_floating_point(), "bias: expected a floating tensor, got ", bias->scalar_type());
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({x2.size(0), w.N}, x2.options());
  if (x2.size(0) > 0)
    ctp::int4_linear(current_isa(), w, x2.data_ptr<float>(), x2.size(0), b.defined() ? b.data_ptr<float>() : nullptr,
                     y.data_ptr<float>(), parallel_torch);
  return y.to(x.scalar_type()).view(with_last(x, w.N));
}

at::Tensor int4_linear_grad_input(const at::Tensor& grad_y, const at::Tensor& qweight, const at::Tensor& scales,
                                  const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& perm,
                                  int64_t out_features, int64_t group_size) {
  ctp::Int4View w = int4_view(qweight, scales, zeros, perm, out_features, group_size);
  at::Tensor g2 = activations_2d(grad_y, "grad_y", w.N);
  at::Tensor gx = at::empty({g2.size(0), w.K}, g2.options());
  if (g2.size(0) > 0)
    ctp::int4_linear_grad_input(current_isa(), w, g2.data_ptr<float>(), g2.size(0), gx.data_ptr<float>(),
                                parallel_torch);
  return gx.to(grad_y.scalar_type()).view(with_last(grad_y, w.K));
}

}  // namespace

TORCH_LIBRARY(ctp_fast, m) {
  m.def(
      "int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? perm, Tensor? bias, "
      "int out_features, int group_size) -> Tensor");
  m.def(
      "int4_linear_grad_input(Tensor grad_y, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? perm, "
      "int out_features, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(ctp_fast, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_linear_grad_input", &int4_linear_grad_input);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "ctp_fast kernels (ops are registered under torch.ops.ctp_fast)";
  m.def("set_isa", &set_isa, "Force the CPU instruction-set path: 'scalar', 'avx2' or 'avx512'.");
  m.def("get_isa", []() { return std::string(ctp::isa_name(current_isa())); },
        "The CPU instruction-set path in use.");
  m.def("supported_isas", &supported_isas, "Instruction-set paths this CPU can run.");
  m.def("has_cuda", []() {
#ifdef CTP_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
