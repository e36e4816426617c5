// CUDA implementations of the ctp_fast ops (built only when torch has CUDA: setup.py defines
// CTP_WITH_CUDA and compiles csrc/cuda/*.cu). Argument checks with clear messages, then the plain
// CUDA kernels of csrc/cuda/kernels.h on the current stream. Packed weights must be in the CUDA layout
// (ctp_fast/formats/cuda_layout.py), which PackedWeight.to("cuda") / CompressedLinear.to("cuda") build.
#ifdef CTP_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/kernels.h"

namespace {

constexpr const char* kMoveHint =
    " (the CUDA layout: move packed weights with PackedWeight.to('cuda') or module.to('cuda'), which repack)";

void check_cuda(const at::Tensor& t, const char* name, const at::Device& dev, const char* like) {
  TORCH_CHECK(t.device() == dev, name, ": expected a CUDA tensor on ", dev, " like ", like, ", got ", t.device());
}

void check_packed(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                  const at::Device& dev) {
  check_cuda(t, name, dev, "x");
  TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == shape && t.is_contiguous(), name, ": expected a contiguous ",
              dtype, " tensor of shape ", shape, kMoveHint, ", got ", t.scalar_type(), " ", t.sizes());
}

ctp_cuda::DType act_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
              ": the CUDA kernels take float16 or bfloat16, got ", t.scalar_type(),
              " (cast the model or inputs with .half() or .bfloat16())");
  return t.scalar_type() == at::kHalf ? ctp_cuda::DType::f16 : ctp_cuda::DType::bf16;
}

void check_launch(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "ctp_fast CUDA ", what, " failed: ", cudaGetErrorString(e));
}

ctp_cuda::QWeight packed_view(const at::Device& dev, const at::Tensor& codes, const at::Tensor& scales,
                              const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& perm,
                              const c10::optional<at::Tensor>& masks, const c10::optional<at::Tensor>& offsets,
                              int64_t layout, int64_t bits, int64_t N, int64_t K, int64_t group_size) {
  TORCH_CHECK(layout >= 0 && layout <= 2, "layout: expected 0 (dense), 1 (2:4) or 2 (unstructured), got ", layout);
  TORCH_CHECK(bits == 4, "bits: the CUDA kernels take 4-bit weights, got ", bits);
  TORCH_CHECK(N > 0 && K > 0 && N < (int64_t(1) << 30) && K < (int64_t(1) << 30),
              "out_features and in_features must be positive (and below 2^30), got ", N, " and ", K);
  if (group_size == -1) group_size = K;
  TORCH_CHECK(group_size > 0 && (group_size % 32 == 0 || group_size == K),
              "group_size: the CUDA kernels need a multiple of 32 or one group per row, got ", group_size);
  ctp_cuda::QWeight w{};
  w.layout = static_cast<ctp_cuda::Layout>(layout);
  w.N = int(N), w.K = int(K), w.group_size = int(group_size), w.G = int((K + group_size - 1) / group_size);
  const int64_t nt = w.Np() / 16, steps = w.Kp() / w.chunk_k();
  if (w.layout == ctp_cuda::Layout::unstructured) {
    check_cuda(codes, "codes", dev, "x");
    TORCH_CHECK(codes.scalar_type() == at::kInt && codes.dim() == 1 && codes.is_contiguous(),
                "codes: expected the contiguous 1-D int32 code stream", kMoveHint, ", got ", codes.scalar_type(), " ",
                codes.sizes());
  } else {
    check_packed(codes, "codes", at::kInt, {nt, steps, 32, 4}, dev);
  }
  w.qweight = reinterpret_cast<const uint32_t*>(codes.data_ptr<int32_t>());
  check_cuda(scales, "scales", dev, "x");
  switch (scales.scalar_type()) {
    case at::kFloat: w.scale_type = ctp_cuda::ScaleType::f32; break;
    case at::kHalf: w.scale_type = ctp_cuda::ScaleType::f16; break;
    case at::kBFloat16: w.scale_type = ctp_cuda::ScaleType::bf16; break;
    default: TORCH_CHECK(false, "scales: expected float32, float16 or bfloat16, got ", scales.scalar_type());
  }
  TORCH_CHECK(scales.sizes() == at::IntArrayRef({int64_t(w.G), int64_t(w.Np())}) && scales.is_contiguous(),
              "scales: expected a contiguous tensor of shape [", w.G, ", ", w.Np(), "]", kMoveHint, ", got ",
              scales.sizes());
  w.scales = scales.data_ptr();
  if (zeros.has_value()) {
    check_packed(*zeros, "zeros", at::kByte, scales.sizes(), dev);
    w.zeros = zeros->data_ptr<uint8_t>();
  }
  if (perm.has_value()) {
    check_packed(*perm, "perm", at::kLong, {K}, dev);
    w.perm = perm->data_ptr<int64_t>();
  }
  if (w.layout == ctp_cuda::Layout::sparse24) {
    TORCH_CHECK(masks.has_value(), "masks: the 2:4 CUDA layout needs its mma.sp metadata (masks)");
    check_packed(*masks, "masks", at::kInt, {nt, steps, 16, 4}, dev);
    w.masks = reinterpret_cast<const uint32_t*>(masks->data_ptr<int32_t>());
  } else if (w.layout == ctp_cuda::Layout::unstructured) {
    TORCH_CHECK(masks.has_value() && offsets.has_value(), "masks and offsets are required for unstructured weights");
    check_packed(*masks, "masks", at::kInt, {nt, steps, 32}, dev);
    check_packed(*offsets, "offsets", at::kInt, {nt * steps + 1}, dev);
    w.masks = reinterpret_cast<const uint32_t*>(masks->data_ptr<int32_t>());
    w.offsets = offsets->data_ptr<int32_t>();
  }
  return w;
}

at::Tensor rows_2d(const at::Tensor& t, int64_t width) {
  at::Tensor r = t.reshape({-1, width});
  return r.stride(1) == 1 && (r.size(0) <= 1 || r.stride(0) >= width) ? r : r.contiguous();
}

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
  s.back() = last;
  return s;
}

at::Tensor packed_linear_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                              const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& perm,
                              const c10::optional<at::Tensor>& masks, const c10::optional<at::Tensor>& offsets,
                              const c10::optional<at::Tensor>& bias, int64_t layout, int64_t bits, int64_t out_features,
                              int64_t in_features, int64_t group_size) {
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  ctp_cuda::QWeight w = packed_view(x.device(), codes, scales, zeros, perm, masks, offsets, layout, bits, out_features,
                                    in_features, group_size);
  const ctp_cuda::DType dt = act_dtype(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "x: expected last dimension ", in_features, ", got shape ",
              x.sizes());
  at::Tensor x2 = rows_2d(x, in_features);
  at::Tensor b;
  if (bias.has_value()) {
    check_cuda(*bias, "bias", x.device(), "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "bias: expected shape [", out_features, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->is_floating_point(), "bias: expected a floating tensor, got ", bias->scalar_type());
    b = bias->to(x.scalar_type()).contiguous();
  }
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, out_features}, x.options());
  at::Tensor ws = at::empty({int64_t(ctp_cuda::qlinear_workspace_floats(w, M))}, x.options().dtype(at::kFloat));
  check_launch(ctp_cuda::qlinear_forward(dt, w, x2.data_ptr(), x2.size(0) > 1 ? x2.stride(0) : in_features, M,
                                         b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), ws.data_ptr<float>(),
                                         c10::cuda::getCurrentCUDAStream()),
               "packed_linear");
  return y.view(with_last(x, out_features));
}

at::Tensor packed_linear_grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& codes, const at::Tensor& scales,
                                         const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& perm,
                                         const c10::optional<at::Tensor>& masks,
                                         const c10::optional<at::Tensor>& offsets, int64_t layout, int64_t bits,
                                         int64_t out_features, int64_t in_features, int64_t group_size) {
  TORCH_CHECK(grad_y.is_cuda(), "grad_y: expected a CUDA tensor, got ", grad_y.device());
  const c10::cuda::CUDAGuard guard(grad_y.device());
  ctp_cuda::QWeight w = packed_view(grad_y.device(), codes, scales, zeros, perm, masks, offsets, layout, bits,
                                    out_features, in_features, group_size);
  const ctp_cuda::DType dt = act_dtype(grad_y, "grad_y");
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == out_features, "grad_y: expected last dimension ", out_features,
              ", got shape ", grad_y.sizes());
  at::Tensor g2 = rows_2d(grad_y, out_features);
  const int64_t M = g2.size(0);
  at::Tensor gx = at::empty({M, in_features}, grad_y.options());
  at::Tensor ws = at::empty({int64_t(ctp_cuda::qlinear_grad_workspace_floats(w, M))},
                            grad_y.options().dtype(at::kFloat));
  check_launch(ctp_cuda::qlinear_grad_input(dt, w, g2.data_ptr(), g2.size(0) > 1 ? g2.stride(0) : out_features, M,
                                            gx.data_ptr(), ws.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "packed_linear_grad_input");
  return gx.view(with_last(grad_y, in_features));
}

// ------------------------------------------------------------------------ prefix attention
at::Tensor last_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

ctp_cuda::AttnArgs attn_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kp,
                             const at::Tensor& vp, const c10::optional<at::Tensor>& kv_start, at::Tensor& kv32,
                             bool causal, double scale) {
  TORCH_CHECK(q.is_cuda(), "q: expected a CUDA tensor, got ", q.device());
  act_dtype(q, "q");
  const at::Device dev = q.device();
  TORCH_CHECK(q.dim() == 4, "q: expected [batch, heads, queries, head_dim], got shape ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  TORCH_CHECK(D > 0 && D <= 256, "q: head_dim must be in 1..256, got ", D);
  const std::pair<const at::Tensor*, const char*> all[] = {{&k, "k"}, {&v, "v"}, {&kp, "k_prefix"}, {&vp, "v_prefix"}};
  for (auto [t, name] : all) {
    check_cuda(*t, name, dev, "q");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, ": expected ", q.scalar_type(), " like q, got ",
                t->scalar_type());
  }
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(3) == D, "k: expected [", B, ", kv_heads, keys, ", D,
              "], got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  const int64_t Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "k: heads of q (", H, ") must be a multiple of the kv heads (", Hkv, ")");
  TORCH_CHECK(S >= L, "k: expected at least as many keys as queries (", L, "), got ", S);
  TORCH_CHECK(kp.dim() == 3 && kp.size(0) == Hkv && kp.size(2) == D, "k_prefix: expected [", Hkv, ", prefix, ", D,
              "], got shape ", kp.sizes());
  TORCH_CHECK(vp.sizes() == kp.sizes(), "v_prefix: expected the shape of k_prefix ", kp.sizes(), ", got ", vp.sizes());
  ctp_cuda::AttnArgs a{};
  a.B = int(B), a.H = int(H), a.Hkv = int(Hkv), a.L = int(L), a.S = int(S), a.P = int(kp.size(1)), a.D = int(D);
  for (int i = 0; i < 3; ++i) a.q_s[i] = q.stride(i), a.k_s[i] = k.stride(i), a.v_s[i] = v.stride(i);
  for (int i = 0; i < 2; ++i) a.kp_s[i] = kp.stride(i), a.vp_s[i] = vp.stride(i);
  if (kv_start.has_value()) {
    check_cuda(*kv_start, "kv_start", dev, "q");
    TORCH_CHECK((kv_start->scalar_type() == at::kInt || kv_start->scalar_type() == at::kLong) &&
                    kv_start->dim() == 1 && kv_start->size(0) == B,
                "kv_start: expected an int32 or int64 tensor of shape [", B, "], got ", kv_start->scalar_type(), " ",
                kv_start->sizes());
    kv32 = kv_start->to(at::kInt).contiguous();
    a.kv_start = kv32.data_ptr<int32_t>();
  }
  a.causal = causal;
  a.scale = float(scale);
  return a;
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                         const at::Tensor& v_, const at::Tensor& kp_,
                                                         const at::Tensor& vp_,
                                                         const c10::optional<at::Tensor>& kv_start, bool causal,
                                                         double scale) {
  const c10::cuda::CUDAGuard guard(q_.device());
  at::Tensor q = last_contiguous(q_), k = last_contiguous(k_), v = last_contiguous(v_), kp = last_contiguous(kp_),
             vp = last_contiguous(vp_), kv32;
  ctp_cuda::AttnArgs a = attn_args(q, k, v, kp, vp, kv_start, kv32, causal, scale);
  at::Tensor out = at::empty({a.B, a.H, a.L, a.D}, q.options());
  at::Tensor lse = at::empty({a.B, a.H, a.L}, q.options().dtype(at::kFloat));
  const int splits = ctp_cuda::prefix_attention_splits(a);
  at::Tensor scratch =
      at::empty({int64_t(splits) * a.B * a.H * a.L * (a.D + 1)}, q.options().dtype(at::kFloat));
  check_launch(ctp_cuda::prefix_attention_forward(act_dtype(q, "q"), a, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                                  kp.data_ptr(), vp.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                                                  scratch.data_ptr<float>(), splits, c10::cuda::getCurrentCUDAStream()),
               "prefix_attention");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& kp_, const at::Tensor& vp_, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& kv_start, bool causal, double scale) {
  const c10::cuda::CUDAGuard guard(q_.device());
  at::Tensor q = last_contiguous(q_), k = last_contiguous(k_), v = last_contiguous(v_), kp = last_contiguous(kp_),
             vp = last_contiguous(vp_), kv32;
  ctp_cuda::AttnArgs a = attn_args(q, k, v, kp, vp, kv_start, kv32, causal, scale);
  const std::vector<int64_t> qshape{a.B, a.H, a.L, a.D};
  check_cuda(grad_out, "grad_out", q.device(), "q");
  check_cuda(out, "out", q.device(), "q");
  check_cuda(lse, "lse", q.device(), "q");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(qshape) && grad_out.scalar_type() == q.scalar_type(),
              "grad_out: expected ", q.scalar_type(), " of shape ", at::IntArrayRef(qshape), ", got ",
              grad_out.scalar_type(), " ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(qshape) && out.scalar_type() == q.scalar_type(), "out: expected ",
              q.scalar_type(), " of shape ", at::IntArrayRef(qshape), " (the forward's output), got ",
              out.scalar_type(), " ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef({a.B, a.H, a.L}),
              "lse: expected float32 of shape [", a.B, ", ", a.H, ", ", a.L, "] (the forward's lse), got ",
              lse.scalar_type(), " ", lse.sizes());
  at::Tensor go = grad_out.contiguous(), o = out.contiguous(), ls = lse.contiguous();
  at::Tensor dq = at::empty(qshape, q.options());
  at::Tensor dk = at::empty({a.B, a.Hkv, a.S, a.D}, k.options());
  at::Tensor dv = at::empty({a.B, a.Hkv, a.S, a.D}, v.options());
  at::Tensor dkp = at::zeros({a.Hkv, a.P, a.D}, kp.options().dtype(at::kFloat));
  at::Tensor dvp = at::zeros({a.Hkv, a.P, a.D}, vp.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({int64_t(a.B) * a.H * a.L}, q.options().dtype(at::kFloat));
  check_launch(ctp_cuda::prefix_attention_backward(
                   act_dtype(q, "q"), a, go.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), kp.data_ptr(),
                   vp.data_ptr(), o.data_ptr(), ls.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                   dkp.data_ptr<float>(), dvp.data_ptr<float>(), delta.data_ptr<float>(),
                   c10::cuda::getCurrentCUDAStream()),
               "prefix_attention_backward");
  return {dq, dk, dv, dkp.to(kp_.scalar_type()), dvp.to(vp_.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ctp_fast, CUDA, m) {
  m.impl("packed_linear", &packed_linear_cuda);
  m.impl("packed_linear_grad_input", &packed_linear_grad_input_cuda);
  m.impl("prefix_attention", &prefix_attention_cuda);
  m.impl("prefix_attention_backward", &prefix_attention_backward_cuda);
}
#endif  // CTP_WITH_CUDA
