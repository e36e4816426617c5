// Prompt-prefixed attention kernels (csrc/cpu/attention.h) against a plain double-precision reference:
// forward (out, lse) and backward (dq, dk, dv, summed-over-batch prompt grads) for every instruction set
// this CPU supports, serially and on two threads, over shapes with GQA, decode (L < S), no prompt,
// left padding and non-causal attention. Built by CMake; run under ASan/UBSan by tests/cpp/run_sanitized.sh.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "attention.h"

namespace {

int failures = 0, checks = 0;

void expect_close(const std::vector<float>& got, const std::vector<double>& want, double tol, const std::string& what) {
  double scale = 1e-6;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < want.size(); ++i) {
    ++checks;
    const bool both_inf = std::isinf(want[i]) && std::isinf(got[i]) && (want[i] < 0) == (got[i] < 0);
    if (!both_inf && !(std::fabs(got[i] - want[i]) <= tol * scale)) {
      if (++failures < 20) std::printf("FAIL %s [%zu]: got %g want %g\n", what.c_str(), i, got[i], want[i]);
      return;
    }
  }
}

void run_two_threads(int64_t n, void* ctx, ctp::TaskFn body) {
  const int64_t half = n / 2;
  std::thread t([=] { if (half > 0) body(ctx, 0, half); });
  if (n - half > 0) body(ctx, half, n);
  t.join();
}

struct Shape { int64_t B, H, Hkv, L, S, P, D; bool causal, padded; };

struct Ref {  // double-precision forward and backward
  std::vector<double> out, lse, dq, dk, dv, dkp, dvp;
};

Ref reference(const Shape& s, const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
              const std::vector<float>& kp, const std::vector<float>& vp, const std::vector<int64_t>& start,
              const std::vector<float>& go, float scale) {
  const int64_t G = s.H / s.Hkv, N = s.P + s.S, D = s.D;
  Ref r;
  r.out.assign(s.B * s.H * s.L * D, 0.0);
  r.lse.assign(s.B * s.H * s.L, 0.0);
  r.dq.assign(q.size(), 0.0);
  r.dk.assign(k.size(), 0.0);
  r.dv.assign(v.size(), 0.0);
  r.dkp.assign(kp.size(), 0.0);
  r.dvp.assign(vp.size(), 0.0);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h) {
      const int64_t g = h / G;
      auto key = [&](int64_t j) { return j < s.P ? &kp[(g * s.P + j) * D] : &k[((b * s.Hkv + g) * s.S + j - s.P) * D]; };
      auto val = [&](int64_t j) { return j < s.P ? &vp[(g * s.P + j) * D] : &v[((b * s.Hkv + g) * s.S + j - s.P) * D]; };
      for (int64_t i = 0; i < s.L; ++i) {
        const float* qi = &q[((b * s.H + h) * s.L + i) * D];
        const int64_t row = (b * s.H + h) * s.L + i;
        std::vector<double> sc(N, -INFINITY), p(N, 0.0);
        double mx = -INFINITY;
        for (int64_t j = 0; j < N; ++j) {
          const int64_t own = j - s.P;
          if (j >= s.P && ((s.causal && own > s.S - s.L + i) || (s.padded && own < start[b]))) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += double(qi[d]) * key(j)[d];
          sc[j] = dot * scale;
          mx = std::max(mx, sc[j]);
        }
        if (mx == -INFINITY) {
          r.lse[row] = -INFINITY;
          continue;
        }
        double sum = 0;
        for (int64_t j = 0; j < N; ++j) sum += p[j] = std::exp(sc[j] - mx);
        r.lse[row] = mx + std::log(sum);
        std::vector<double> o(D, 0.0);
        for (int64_t j = 0; j < N; ++j) {
          p[j] /= sum;
          for (int64_t d = 0; d < D; ++d) o[d] += p[j] * val(j)[d];
        }
        const float* gi = &go[row * D];
        double delta = 0;
        for (int64_t d = 0; d < D; ++d) {
          r.out[row * D + d] = o[d];
          delta += gi[d] * o[d];
        }
        for (int64_t j = 0; j < N; ++j) {
          if (p[j] == 0) continue;
          double dp = 0;
          for (int64_t d = 0; d < D; ++d) dp += double(gi[d]) * val(j)[d];
          const double ds = p[j] * (dp - delta) * scale;
          double* dkj = j < s.P ? &r.dkp[(g * s.P + j) * D] : &r.dk[((b * s.Hkv + g) * s.S + j - s.P) * D];
          double* dvj = j < s.P ? &r.dvp[(g * s.P + j) * D] : &r.dv[((b * s.Hkv + g) * s.S + j - s.P) * D];
          for (int64_t d = 0; d < D; ++d) {
            r.dq[row * D + d] += ds * key(j)[d];
            dkj[d] += ds * qi[d];
            dvj[d] += p[j] * gi[d];
          }
        }
      }
    }
  return r;
}

void check_shape(const Shape& s, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  auto randv = [&](int64_t n) {
    std::vector<float> x(n);
    for (auto& e : x) e = nd(rng);
    return x;
  };
  const int64_t D = s.D;
  auto q = randv(s.B * s.H * s.L * D), k = randv(s.B * s.Hkv * s.S * D), v = randv(s.B * s.Hkv * s.S * D),
       kp = randv(s.Hkv * s.P * D), vp = randv(s.Hkv * s.P * D), go = randv(s.B * s.H * s.L * D);
  std::vector<int64_t> start(s.B);
  for (int64_t b = 0; b < s.B; ++b) start[b] = int64_t(rng() % std::min<int64_t>(s.S, 4));
  const float scale = 1.0f / std::sqrt(float(D));
  ctp::AttnArgs a{s.B, s.H, s.Hkv, s.L, s.S, s.P, D, q.data(), k.data(), v.data(),
                  {s.H * s.L * D, s.L * D, D}, {s.Hkv * s.S * D, s.S * D, D}, {s.Hkv * s.S * D, s.S * D, D},
                  kp.data(), vp.data(), s.padded ? start.data() : nullptr, s.causal, scale};
  const Ref r = reference(s, q, k, v, kp, vp, start, go, scale);
  const ctp::Isa isas[] = {ctp::Isa::scalar, ctp::Isa::avx2, ctp::Isa::avx512};
  const std::pair<const char*, ctp::ParallelFn> runners[] = {{"serial", ctp::run_serial}, {"2-threads", run_two_threads}};
  for (ctp::Isa isa : isas) {
    if (!ctp::isa_supported(isa)) continue;
    for (const auto& [run, par] : runners) {
      char name[200];
      std::snprintf(name, sizeof name, "%s %s B%lld H%lld/%lld L%lld S%lld P%lld D%lld causal%d padded%d",
                    ctp::isa_name(isa), run, (long long)s.B, (long long)s.H, (long long)s.Hkv, (long long)s.L,
                    (long long)s.S, (long long)s.P, (long long)D, s.causal, s.padded);
      std::vector<float> out(r.out.size()), lse(r.lse.size());
      ctp::prefix_attention_fwd(isa, a, out.data(), lse.data(), par);
      expect_close(out, r.out, 2e-5, std::string(name) + " out");
      expect_close(lse, r.lse, 2e-5, std::string(name) + " lse");
      std::vector<float> dq(q.size()), dk(k.size()), dv(v.size()), dkp_b(s.B * kp.size()), dvp_b(s.B * vp.size());
      ctp::prefix_attention_bwd(isa, a, out.data(), lse.data(), go.data(), dq.data(), dk.data(), dv.data(),
                                dkp_b.data(), dvp_b.data(), par);
      std::vector<float> dkp(kp.size(), 0.0f), dvp(vp.size(), 0.0f);
      for (int64_t b = 0; b < s.B; ++b)
        for (size_t i = 0; i < kp.size(); ++i) {
          dkp[i] += dkp_b[b * kp.size() + i];
          dvp[i] += dvp_b[b * vp.size() + i];
        }
      expect_close(dq, r.dq, 5e-5, std::string(name) + " dq");
      expect_close(dk, r.dk, 5e-5, std::string(name) + " dk");
      expect_close(dv, r.dv, 5e-5, std::string(name) + " dv");
      expect_close(dkp, r.dkp, 5e-5, std::string(name) + " dk_prefix");
      expect_close(dvp, r.dvp, 5e-5, std::string(name) + " dv_prefix");
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  const Shape shapes[] = {
      {1, 1, 1, 1, 1, 1, 4, true, false},    {2, 6, 2, 5, 5, 7, 16, true, true},
      {1, 9, 3, 1, 40, 100, 64, true, true},  {3, 4, 4, 70, 90, 3, 33, false, true},
      {2, 2, 1, 130, 130, 0, 8, true, true},  {2, 3, 3, 3, 3, 65, 256, false, false},
      {2, 4, 2, 20, 20, 0, 8, true, true},
  };
  for (const Shape& s : shapes) check_shape(s, rng);
  std::printf("test_attention: %d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}
