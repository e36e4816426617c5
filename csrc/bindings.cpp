// The one place where torch meets the kernels: argument checks with clear messages, dtype
// handling, thread pool, op registration (TORCH_LIBRARY) and the ctp_fast._C module.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>

#include "cpu/attention.h"
#include "cpu/qlinear.h"

namespace {

using ctp::Isa;

// -1: not chosen yet (resolved from CTP_FAST_ISA on first use).
std::atomic<int> g_isa{-1};

Isa resolve_isa(const std::string& name, const char* origin) {
  Isa isa;
  TORCH_CHECK(ctp::isa_from_name(name.c_str(), &isa), origin, "='", name,
              "' is not an instruction set ctp_fast knows; expected one of scalar, avx2, avx512, avx512bf16");
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
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512, Isa::avx512bf16, Isa::amx})
    if (ctp::isa_supported(isa)) out.push_back(ctp::isa_name(isa));
  return out;
}

void parallel_torch(int64_t n, void* ctx, ctp::TaskFn body) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { body(ctx, begin, end); });
}

// Checks the packed weight and returns a view of it (layout/bits/sizes as in csrc/cpu/qlinear.h).
ctp::QView packed_view(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                       const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& masks,
                       const c10::optional<at::Tensor>& offsets, int64_t layout, int64_t bits, int64_t N, int64_t K,
                       int64_t group_size) {
  TORCH_CHECK(layout >= 0 && layout <= 2, "layout: expected 0 (dense), 1 (2:4) or 2 (unstructured), got ", layout);
  TORCH_CHECK(N > 0 && K > 0, "out_features and in_features must be positive, got ", N, " and ", K);
  if (group_size == -1) group_size = K;
  TORCH_CHECK(group_size > 0, "group_size: expected a positive group size or -1 (per channel), got ", group_size);
  const int64_t blocks = (N + 31) / 32, G = (K + group_size - 1) / group_size, chunks = (K + 31) / 32;
  auto check_u8 = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kByte, name, ": expected uint8, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
  };
  check_u8(codes, "codes");
  const auto lay = static_cast<ctp::Layout>(layout);
  if (lay == ctp::Layout::dense) {
    TORCH_CHECK(bits == 3 || bits == 4 || bits == 8, "bits: dense weights have 3, 4 or 8 bits, got ", bits);
    TORCH_CHECK(codes.dim() == 3 && codes.size(0) == blocks && codes.size(1) == K && codes.size(2) == 4 * bits,
                "codes: expected shape [", blocks, ", ", K, ", ", 4 * bits, "] for a ", N, "x", K, " ", bits,
                "-bit weight, got ", codes.sizes());
  } else if (lay == ctp::Layout::sparse24) {
    TORCH_CHECK(K % 4 == 0, "in_features: 2:4 weights need a multiple of 4, got ", K);
    TORCH_CHECK(codes.dim() == 3 && codes.size(0) == blocks && codes.size(1) == K / 4 && codes.size(2) == 48,
                "codes: expected shape [", blocks, ", ", K / 4, ", 48] for a ", N, "x", K, " 2:4 weight, got ",
                codes.sizes());
  } else {
    TORCH_CHECK(codes.dim() == 1, "codes: expected the 1-D code stream of an unstructured weight, got shape ",
                codes.sizes());
  }
  ctp::ScaleType st;
  switch (scales.scalar_type()) {
    case at::kFloat: st = ctp::ScaleType::f32; break;
    case at::kHalf: st = ctp::ScaleType::f16; break;
    case at::kBFloat16: st = ctp::ScaleType::bf16; break;
    default: TORCH_CHECK(false, "scales: expected float32, float16 or bfloat16, got ", scales.scalar_type());
  }
  TORCH_CHECK(scales.device().is_cpu(), "scales: expected a CPU tensor, got ", scales.device());
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == blocks && scales.size(1) == G && scales.size(2) == 32,
              "scales: expected shape [", blocks, ", ", G, ", 32] for K=", K, " and group_size=", group_size,
              ", got ", scales.sizes());
  TORCH_CHECK(scales.is_contiguous(), "scales: expected a contiguous tensor");
  const uint8_t* zp = nullptr;
  if (zeros.has_value()) {
    check_u8(*zeros, "zeros");
    TORCH_CHECK(zeros->sizes() == scales.sizes(), "zeros: expected the shape of scales ", scales.sizes(), ", got ",
                zeros->sizes());
    zp = zeros->data_ptr<uint8_t>();
  }
  const int64_t* pp = nullptr;
  if (perm.has_value()) {
    TORCH_CHECK(perm->device().is_cpu(), "perm: expected a CPU tensor, got ", perm->device());
    TORCH_CHECK(perm->scalar_type() == at::kLong, "perm: expected int64, got ", perm->scalar_type());
    TORCH_CHECK(perm->dim() == 1 && perm->size(0) == K, "perm: expected shape [", K, "], got ", perm->sizes());
    TORCH_CHECK(perm->is_contiguous(), "perm: expected a contiguous tensor");
    pp = perm->data_ptr<int64_t>();
    for (int64_t k = 0; k < K; ++k)
      TORCH_CHECK(pp[k] >= 0 && pp[k] < K, "perm: entry ", k, " is ", pp[k], ", outside [0, ", K, ")");
  }
  const uint32_t* mp = nullptr;
  const int64_t* op = nullptr;
  if (lay == ctp::Layout::unstructured) {
    TORCH_CHECK(masks.has_value() && offsets.has_value(), "masks and offsets are required for unstructured weights");
    TORCH_CHECK(masks->device().is_cpu() && masks->scalar_type() == at::kInt && masks->is_contiguous() &&
                    masks->sizes() == at::IntArrayRef({blocks, K}),
                "masks: expected a contiguous CPU int32 tensor of shape [", blocks, ", ", K, "], got ",
                masks->scalar_type(), " ", masks->sizes());
    TORCH_CHECK(offsets->device().is_cpu() && offsets->scalar_type() == at::kLong && offsets->is_contiguous() &&
                    offsets->sizes() == at::IntArrayRef({blocks, chunks}),
                "offsets: expected a contiguous CPU int64 tensor of shape [", blocks, ", ", chunks, "], got ",
                offsets->scalar_type(), " ", offsets->sizes());
    mp = reinterpret_cast<const uint32_t*>(masks->data_ptr<int32_t>());
    op = offsets->data_ptr<int64_t>();
    // What is cheap to check here: offsets ascending from 0 and inside the stream, no padding row kept.
    // The kernels count every column's codes anyway and report masks that disagree with offsets
    // (KernelError, raised after the call); their reads stay inside the stream regardless.
    const int64_t nbytes = codes.numel();
    TORCH_CHECK(nbytes >= 8, "codes: an unstructured code stream ends with 8 spare bytes, got ", nbytes,
                " bytes (a weight packed by an older ctp_fast? repack it)");
    for (int64_t i = 0, prev = 0; i < blocks * chunks; prev = op[i], ++i) {
      TORCH_CHECK(i > 0 || op[i] == 0, "offsets: entry [0, 0] is ", op[i], " but the codes start at byte 0");
      TORCH_CHECK(op[i] >= prev, "offsets: entry [", i / chunks, ", ", i % chunks, "] is ", op[i],
                  ", below the entry before it (", prev, ")");
      TORCH_CHECK(op[i] <= nbytes - 8, "codes: the masks keep codes up to byte ", op[i], " (offsets entry [",
                  i / chunks, ", ", i % chunks, "]) but the stream holds only ", nbytes, " bytes");
    }
    uint32_t allowed = 0;  // nibble order: bit p is row (p % 2) * 16 + p / 2 of the block
    for (int p = 0; p < 32; ++p)
      if ((blocks - 1) * 32 + (p & 1) * 16 + (p >> 1) < N) allowed |= 1u << p;
    for (int64_t k = 0; k < K; ++k)
      TORCH_CHECK(!(mp[(blocks - 1) * K + k] & ~allowed), "masks: block ", blocks - 1, " column ", k,
                  " keeps rows past out_features=", N);
  }
  static const uint8_t no_codes = 0;  // a fully pruned weight has an empty (possibly null) code stream
  const uint8_t* cp = codes.numel() ? codes.data_ptr<uint8_t>() : &no_codes;
  ctp::QView w{lay, int(bits), cp, mp, op, scales.data_ptr(), zp, pp, N, K, group_size, st, codes.numel()};
  const char* bad = ctp::check_view(w);
  TORCH_CHECK(!bad, bad);
  return w;
}

// Activations: fp32 or bf16 on the CPU, last dim `width`; returns a contiguous 2-D copy/view, kept in bf16
// when the bf16 kernels take it (ctp::bf16_gemm), else in fp32.
at::Tensor activations_2d(const at::Tensor& t, const char* name, int64_t width) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              ": expected float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == width, name, ": expected last dimension ", width, ", got shape ",
              t.sizes());
  at::Tensor t2 = t.reshape({-1, width});
  const bool bf16 = t.scalar_type() == at::kBFloat16 && ctp::bf16_gemm(current_isa(), t2.size(0));
  return t2.to(bf16 ? at::kBFloat16 : at::kFloat).contiguous();
}

const uint16_t* bf16_bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
  s.back() = last;
  return s;
}

// An unstructured weight whose masks disagree with its offsets, found by the kernel.
void raise_kernel_error(const ctp::KernelError& e, int64_t blocks, int64_t codes_bytes) {
  if (!e.set) return;
  TORCH_CHECK(e.block < blocks, "codes: the masks keep codes up to byte ", e.found + 8, " (with the 8 spare bytes) "
              "but the stream holds only ", codes_bytes, " bytes");
  TORCH_CHECK(false, "offsets: entry [", e.block, ", ", e.chunk, "] is ", e.offset, " but the masks before it hold "
              "codes up to byte ", e.found, " (masks and offsets disagree)");
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                         const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& perm,
                         const c10::optional<at::Tensor>& masks, const c10::optional<at::Tensor>& offsets,
                         const c10::optional<at::Tensor>& bias, int64_t layout, int64_t bits, int64_t out_features,
                         int64_t in_features, int64_t group_size) {
  ctp::QView w = packed_view(codes, scales, zeros, perm, masks, offsets, layout, bits, out_features, in_features,
                             group_size);
  at::Tensor x2 = activations_2d(x, "x", w.K);
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu(), "bias: expected a CPU tensor, got ", bias->device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.N, "bias: expected shape [", w.N, "], got ", bias->sizes());
    TORCH_CHECK(bias->is_floating_point(), "bias: expected a floating tensor, got ", bias->scalar_type());
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({x2.size(0), w.N}, x2.options().dtype(at::kFloat));
  ctp::KernelError err;
  w.error = &err;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (x2.scalar_type() == at::kBFloat16)
    ctp::linear_bf16(w, bf16_bits(x2), x2.size(0), bp, y.data_ptr<float>(), parallel_torch);
  else if (x2.size(0) > 0)
    ctp::linear(current_isa(), w, x2.data_ptr<float>(), x2.size(0), bp, y.data_ptr<float>(), parallel_torch);
  raise_kernel_error(err, w.nblocks(), w.codes_bytes);
  return y.to(x.scalar_type()).view(with_last(x, w.N));
}

at::Tensor packed_linear_grad_input(const at::Tensor& grad_y, const at::Tensor& codes, const at::Tensor& scales,
                                    const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& perm,
                                    const c10::optional<at::Tensor>& masks, const c10::optional<at::Tensor>& offsets,
                                    int64_t layout, int64_t bits, int64_t out_features, int64_t in_features,
                                    int64_t group_size) {
  ctp::QView w = packed_view(codes, scales, zeros, perm, masks, offsets, layout, bits, out_features, in_features,
                             group_size);
  at::Tensor g2 = activations_2d(grad_y, "grad_y", w.N);
  at::Tensor gx = at::empty({g2.size(0), w.K}, g2.options().dtype(at::kFloat));
  ctp::KernelError err;
  w.error = &err;
  if (g2.scalar_type() == at::kBFloat16)
    ctp::linear_grad_input_bf16(w, bf16_bits(g2), g2.size(0), gx.data_ptr<float>(), parallel_torch);
  else if (g2.size(0) > 0)
    ctp::linear_grad_input(current_isa(), w, g2.data_ptr<float>(), g2.size(0), gx.data_ptr<float>(), parallel_torch);
  raise_kernel_error(err, w.nblocks(), w.codes_bytes);
  return gx.to(grad_y.scalar_type()).view(with_last(grad_y, w.K));
}

// ------------------------------------------------------------------ prompt-prefixed attention
// Arguments as in csrc/cpu/attention.h. Works in fp32 (bf16 inputs are converted); views keep their strides.
struct AttnInputs {
  at::Tensor q, k, v, kp, vp, start;
  ctp::AttnArgs args;
};

at::Tensor attn_float(const at::Tensor& t) {
  at::Tensor f = t.to(at::kFloat);
  return f.stride(-1) == 1 ? f : f.contiguous();
}

AttnInputs attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kp,
                            const at::Tensor& vp, const c10::optional<at::Tensor>& kv_start, bool causal,
                            double scale) {
  const std::pair<const at::Tensor*, const char*> all[] = {{&q, "q"}, {&k, "k"}, {&v, "v"}, {&kp, "k_prefix"},
                                                           {&vp, "v_prefix"}};
  for (const auto& [t, name] : all) {
    TORCH_CHECK(t->device().is_cpu(), name, ": expected a CPU tensor, got ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16, name,
                ": expected float32 or bfloat16, got ", t->scalar_type());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, ": expected the dtype of q (", q.scalar_type(),
                "), got ", t->scalar_type());
  }
  TORCH_CHECK(q.dim() == 4, "q: expected [batch, heads, L, head_dim], got shape ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  TORCH_CHECK(D >= 1 && D <= 256, "q: head_dim must be in 1..256, got ", D);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(3) == D && k.size(2) >= L,
              "k: expected [", B, ", kv_heads, S >= ", L, ", ", D, "], got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  const int64_t Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "k: kv_heads (", Hkv, ") must divide the query heads (", H, ")");
  TORCH_CHECK(kp.dim() == 3 && kp.size(0) == Hkv && kp.size(2) == D, "k_prefix: expected [", Hkv,
              ", prompt_len, ", D, "], got shape ", kp.sizes());
  TORCH_CHECK(vp.sizes() == kp.sizes(), "v_prefix: expected the shape of k_prefix ", kp.sizes(), ", got ",
              vp.sizes());
  TORCH_CHECK(std::isfinite(scale), "scale: expected a finite number, got ", scale);
  AttnInputs in;
  in.q = attn_float(q);
  in.k = attn_float(k);
  in.v = attn_float(v);
  in.kp = kp.to(at::kFloat).contiguous();
  in.vp = vp.to(at::kFloat).contiguous();
  if (kv_start.has_value()) {
    const at::Tensor& st = *kv_start;
    TORCH_CHECK(st.device().is_cpu(), "kv_start: expected a CPU tensor, got ", st.device());
    TORCH_CHECK(st.scalar_type() == at::kLong || st.scalar_type() == at::kInt, "kv_start: expected int32 or int64, got ",
                st.scalar_type());
    TORCH_CHECK(st.dim() == 1 && st.size(0) == B, "kv_start: expected shape [", B, "], got ", st.sizes());
    in.start = st.to(at::kLong).contiguous();
  }
  ctp::AttnArgs& a = in.args;
  a = ctp::AttnArgs{B, H, Hkv, L, S, kp.size(1), D, in.q.data_ptr<float>(), in.k.data_ptr<float>(),
                    in.v.data_ptr<float>(), {}, {}, {}, in.kp.data_ptr<float>(), in.vp.data_ptr<float>(),
                    in.start.defined() ? in.start.data_ptr<int64_t>() : nullptr, causal, float(scale)};
  for (int d = 0; d < 3; ++d) {
    a.qs[d] = in.q.stride(d);
    a.ks[d] = in.k.stride(d);
    a.vs[d] = in.v.stride(d);
  }
  return in;
}

std::tuple<at::Tensor, at::Tensor> prefix_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& k_prefix, const at::Tensor& v_prefix,
                                                    const c10::optional<at::Tensor>& kv_start, bool causal,
                                                    double scale) {
  AttnInputs in = attention_inputs(q, k, v, k_prefix, v_prefix, kv_start, causal, scale);
  const auto& a = in.args;
  at::Tensor out = at::empty({a.B, a.H, a.L, a.D}, in.q.options());
  at::Tensor lse = at::empty({a.B, a.H, a.L}, in.q.options());
  if (out.numel() > 0)
    ctp::prefix_attention_fwd(current_isa(), a, out.data_ptr<float>(), lse.data_ptr<float>(), parallel_torch);
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_prefix, const at::Tensor& v_prefix, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& kv_start, bool causal, double scale) {
  AttnInputs in = attention_inputs(q, k, v, k_prefix, v_prefix, kv_start, causal, scale);
  const auto& a = in.args;
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&grad_out, "grad_out"}, {&out, "out"}}) {
    TORCH_CHECK(t->device().is_cpu(), name, ": expected a CPU tensor, got ", t->device());
    TORCH_CHECK(t->sizes() == q.sizes(), name, ": expected the shape of q ", q.sizes(), ", got ", t->sizes());
  }
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({a.B, a.H, a.L}),
              "lse: expected a float32 CPU tensor of shape [", a.B, ", ", a.H, ", ", a.L, "], got ", lse.scalar_type(),
              " ", lse.sizes());
  at::Tensor go = grad_out.to(at::kFloat).contiguous(), o = out.to(at::kFloat).contiguous(), l = lse.contiguous();
  auto opts = in.q.options();
  at::Tensor dq = at::empty({a.B, a.H, a.L, a.D}, opts), dk = at::empty({a.B, a.Hkv, a.S, a.D}, opts),
             dv = at::empty({a.B, a.Hkv, a.S, a.D}, opts), dkp = at::empty({a.B, a.Hkv, a.P, a.D}, opts),
             dvp = at::empty({a.B, a.Hkv, a.P, a.D}, opts);
  if (a.B > 0 && a.L > 0) {
    ctp::prefix_attention_bwd(current_isa(), a, o.data_ptr<float>(), l.data_ptr<float>(), go.data_ptr<float>(),
                              dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(), dkp.data_ptr<float>(),
                              dvp.data_ptr<float>(), parallel_torch);
  } else {
    dq.zero_(), dk.zero_(), dv.zero_(), dkp.zero_(), dvp.zero_();
  }
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt), dkp.sum(0).to(dt), dvp.sum(0).to(dt)};
}

}  // namespace

// Weight arguments, in order: codes, scales, zeros, perm, masks, offsets, then layout (0 dense, 1 2:4,
// 2 unstructured), bits, out_features, in_features, group_size. See csrc/cpu/qlinear.h.
TORCH_LIBRARY(ctp_fast, m) {
  m.def(
      "packed_linear(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? perm, Tensor? masks, "
      "Tensor? offsets, Tensor? bias, int layout, int bits, int out_features, int in_features, int group_size) -> Tensor");
  m.def(
      "packed_linear_grad_input(Tensor grad_y, Tensor codes, Tensor scales, Tensor? zeros, Tensor? perm, "
      "Tensor? masks, Tensor? offsets, int layout, int bits, int out_features, int in_features, int group_size) -> Tensor");
  // Prompt-prefixed attention (csrc/cpu/attention.h): returns (out, lse).
  m.def(
      "prefix_attention(Tensor q, Tensor k, Tensor v, Tensor k_prefix, Tensor v_prefix, Tensor? kv_start, "
      "bool causal, float scale) -> (Tensor, Tensor)");
  m.def(
      "prefix_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor k_prefix, Tensor v_prefix, "
      "Tensor out, Tensor lse, Tensor? kv_start, bool causal, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ctp_fast, CPU, m) {
  m.impl("packed_linear", &packed_linear);
  m.impl("packed_linear_grad_input", &packed_linear_grad_input);
  m.impl("prefix_attention", &prefix_attention);
  m.impl("prefix_attention_backward", &prefix_attention_backward);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "ctp_fast kernels (ops are registered under torch.ops.ctp_fast)";
  m.def("set_isa", &set_isa, "Force the CPU instruction-set path: 'scalar', 'avx2', 'avx512', 'avx512bf16' or 'amx'.");
  m.def("get_isa", []() { return std::string(ctp::isa_name(current_isa())); },
        "The CPU instruction-set path in use.");
  m.def("supported_isas", &supported_isas, "Instruction-set paths this CPU can run.");
  m.def("bf16_gemm", [](int64_t M) { return ctp::bf16_gemm(current_isa(), M); },
        "Whether bf16 activations of M rows run on bf16 dot products (W rounded to bf16) on the current path.");
  m.def("has_cuda", []() {
#ifdef CTP_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
