// Self-contained test of the CPU int4 kernels (csrc/cpu/int4_kernels.h): no torch, no gtest.
//
// Builds random int4 codes, scales (f32 / f16 / bf16), optional uint8 zeros and an optional
// act-order permutation, packs them into the documented layout, and compares
// ctp::int4_linear and ctp::int4_linear_grad_input against a double-precision reference for
// every instruction set this CPU supports, run serially and on two threads.
//
// Exit status is non-zero on any failure; the last line is "N passed, M failed".
// CTP_TEST_QUICK=1 in the environment runs a reduced sweep.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "int4_kernels.h"

namespace {

int g_passed = 0, g_failed = 0;
constexpr int kMaxReported = 30;  // detailed failure messages printed before going quiet

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
    return;
  }
  if (++g_failed <= kMaxReported) std::printf("FAIL: %s\n", what.c_str());
  if (g_failed == kMaxReported) std::printf("(further failures not printed)\n");
}

// ---------------------------------------------------------------- random numbers
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  int below(int n) { return int(next() % uint64_t(n)); }
  float uniform(float lo, float hi) { return lo + (hi - lo) * float(next() >> 40) / float(1 << 24); }
};

// ---------------------------------------------------------------- half / bfloat16 bit patterns
float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Round-to-nearest-even float -> IEEE half, for values in the normal half range only.
uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u, man = u & 0x7fffffu;
  int32_t exp = int32_t((u >> 23) & 0xff) - 127 + 15;
  if (exp <= 0 || exp >= 31) {
    std::fprintf(stderr, "float_to_half: %g is outside the normal half range\n", double(f));
    std::abort();
  }
  uint32_t h = sign | uint32_t(exp) << 10 | man >> 13;
  uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return uint16_t(h);
}
float half_to_float(uint16_t h) {  // normal values (and zero) only, as produced above
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0 && man == 0) return bits_to_float(sign);
  return bits_to_float(sign | (exp - 15 + 127) << 23 | man << 13);
}
uint16_t float_to_bf16(float f) { return uint16_t(float_to_bits(f) >> 16); }  // truncation
float bf16_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

const char* scale_name(ctp::ScaleType st) {
  switch (st) {
    case ctp::ScaleType::f32: return "f32";
    case ctp::ScaleType::f16: return "f16";
    default: return "bf16";
  }
}

// ---------------------------------------------------------------- a packed int4 weight
struct Weight {
  int64_t N, K, gs, G, nb;
  ctp::ScaleType st;
  bool asym, permuted;
  std::vector<uint8_t> q;        // [nb * 32][K] codes in packed column order (padding rows too)
  std::vector<float> scale;      // [nb * 32][G] scale values exactly as the kernel decodes them
  std::vector<uint8_t> zero;     // [nb * 32][G]
  std::vector<int64_t> perm;     // [K] packed column k holds original column perm[k]
  // packed buffers
  std::vector<uint8_t> qweight;  // [nb][K][16]
  std::vector<float> scales_f32;
  std::vector<uint16_t> scales_u16;
  std::vector<uint8_t> zeros;    // [nb][G][32]
  std::vector<double> dense;     // [N][K] reference W in original column order

  ctp::Int4View view() const {
    ctp::Int4View v;
    v.qweight = qweight.data();
    v.scales = st == ctp::ScaleType::f32 ? static_cast<const void*>(scales_f32.data())
                                         : static_cast<const void*>(scales_u16.data());
    v.zeros = asym ? zeros.data() : nullptr;
    v.perm = permuted ? perm.data() : nullptr;
    v.N = N;
    v.K = K;
    v.group_size = gs;
    v.scale_type = st;
    return v;
  }
};

Weight make_weight(Rng& rng, int64_t N, int64_t K, int64_t gs, ctp::ScaleType st, bool asym, bool permuted) {
  Weight w;
  w.N = N, w.K = K, w.gs = gs, w.G = (K + gs - 1) / gs, w.nb = (N + 31) / 32;
  w.st = st, w.asym = asym, w.permuted = permuted;
  const int64_t rows = w.nb * 32, G = w.G;

  // Random codes, scales and zeros for every row, padding rows included (their output is never
  // stored, so random values there check that they do not leak into real rows).
  w.q.resize(rows * K);
  for (auto& c : w.q) c = uint8_t(rng.below(16));
  w.scale.resize(rows * G);
  w.zero.resize(rows * G);
  w.scales_f32.resize(rows * G);
  w.scales_u16.resize(rows * G);
  w.zeros.resize(rows * G);
  for (int64_t b = 0; b < w.nb; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t j = 0; j < 32; ++j) {
        const int64_t n = b * 32 + j, idx = (b * G + g) * 32 + j;
        float s = rng.uniform(0.005f, 0.05f);
        if (rng.below(4) == 0) s = -s;  // negative scales are legal too
        float decoded = s;
        if (st == ctp::ScaleType::f16) {
          w.scales_u16[idx] = float_to_half(s);
          decoded = half_to_float(w.scales_u16[idx]);
        } else if (st == ctp::ScaleType::bf16) {
          w.scales_u16[idx] = float_to_bf16(s);
          decoded = bf16_to_float(w.scales_u16[idx]);
        } else {
          w.scales_f32[idx] = s;
        }
        uint8_t z = asym ? uint8_t(rng.below(16)) : uint8_t(8);
        w.zeros[idx] = z;
        w.scale[n * G + g] = decoded;
        w.zero[n * G + g] = z;
      }
    }
  }

  w.perm.resize(K);
  for (int64_t k = 0; k < K; ++k) w.perm[k] = k;
  if (permuted)
    for (int64_t k = K - 1; k > 0; --k) std::swap(w.perm[k], w.perm[rng.below(int(k + 1))]);

  // Pack: 16 bytes per (block, column); low nibble row 32b + j, high nibble row 32b + 16 + j.
  w.qweight.resize(w.nb * K * 16);
  for (int64_t b = 0; b < w.nb; ++b)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < 16; ++j) {
        uint8_t lo = w.q[(b * 32 + j) * K + k], hi = w.q[(b * 32 + 16 + j) * K + k];
        w.qweight[(b * K + k) * 16 + j] = uint8_t(lo | hi << 4);
      }

  // Reference dense weight: W[n][perm[k]] = (q[n][k] - zero) * scale, group k / gs.
  w.dense.assign(N * K, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = k / gs;
      w.dense[n * K + w.perm[k]] =
          (double(w.q[n * K + k]) - double(w.zero[n * G + g])) * double(w.scale[n * G + g]);
    }
  return w;
}

// ---------------------------------------------------------------- parallel runners
void run_two_threads(int64_t n, void* ctx, ctp::TaskFn body) {
  if (n <= 0) return;
  const int64_t mid = n / 2;
  std::thread t([=] {
    if (mid > 0) body(ctx, 0, mid);
  });
  body(ctx, mid, n);
  t.join();
}

struct Runner {
  const char* name;
  ctp::ParallelFn fn;
};
const Runner kRunners[] = {{"serial", ctp::run_serial}, {"2-threads", run_two_threads}};

// ---------------------------------------------------------------- comparison
constexpr double kRelTol = 1e-5, kAbsTol = 1e-6;

// Compares got against ref with a tolerance scaled by mag (sum of |a| |w| per output).
// Returns a description of the worst element when it fails, "" when it passes.
std::string compare(const std::vector<float>& got, const std::vector<double>& ref,
                    const std::vector<double>& mag, int64_t cols) {
  double worst = 0;
  int64_t worst_i = -1;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double tol = kRelTol * mag[i] + kAbsTol, err = std::fabs(double(got[i]) - ref[i]);
    if (!(err <= tol)) {  // also catches NaN (an output never written)
      const double r = std::isnan(err) ? std::numeric_limits<double>::infinity() : err / tol;
      if (worst_i < 0 || r > worst) worst = r, worst_i = int64_t(i);
    }
  }
  if (worst_i < 0) return "";
  char buf[200];
  std::snprintf(buf, sizeof buf, "worst at [%lld][%lld]: got %.9g want %.9g (err/tol %.3g)",
                (long long)(worst_i / cols), (long long)(worst_i % cols), double(got[worst_i]),
                ref[worst_i], worst);
  return buf;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

std::string describe(ctp::Isa isa, const Weight& w, int64_t M, const char* fn, const char* runner) {
  char buf[300];
  std::snprintf(buf, sizeof buf, "isa=%s fn=%s M=%lld N=%lld K=%lld group=%lld%s scales=%s %s perm=%s run=%s",
                ctp::isa_name(isa), fn, (long long)M, (long long)w.N, (long long)w.K, (long long)w.gs,
                w.gs == w.K ? "(per-channel)" : "", scale_name(w.st), w.asym ? "asym" : "sym",
                w.permuted ? "yes" : "no", runner);
  return buf;
}

void test_weight(Rng& rng, const Weight& w, const std::vector<int64_t>& Ms, const std::vector<ctp::Isa>& isas) {
  const int64_t N = w.N, K = w.K;
  const ctp::Int4View view = w.view();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t M : Ms) {
    std::vector<float> x(M * K), gy(M * N), bias(N);
    for (auto& v : x) v = rng.uniform(-1.f, 1.f);
    for (auto& v : gy) v = rng.uniform(-1.f, 1.f);
    for (auto& v : bias) v = rng.uniform(-1.f, 1.f);

    // y = x W^T (+ bias), gx = gy W, in double; mag = sum |a| |w| per output.
    std::vector<double> y_ref(M * N), y_mag(M * N), yb_ref(M * N), yb_mag(M * N);
    std::vector<double> gx_ref(M * K, 0.0), gx_mag(M * K, 0.0);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        double acc = 0, mag = 0;
        const double* wr = &w.dense[n * K];
        const float* xr = &x[m * K];
        for (int64_t k = 0; k < K; ++k) {
          acc += double(xr[k]) * wr[k];
          mag += std::fabs(double(xr[k]) * wr[k]);
        }
        y_ref[m * N + n] = acc, y_mag[m * N + n] = mag;
        yb_ref[m * N + n] = acc + bias[n], yb_mag[m * N + n] = mag + std::fabs(double(bias[n]));
        const double g = gy[m * N + n];
        double* gr = &gx_ref[m * K];
        double* gm = &gx_mag[m * K];
        for (int64_t k = 0; k < K; ++k) {
          gr[k] += g * wr[k];
          gm[k] += std::fabs(g * wr[k]);
        }
      }
    }

    for (ctp::Isa isa : isas) {
      std::vector<float> serial_y[2], serial_gx;  // serial results, to compare threaded runs bitwise
      for (const Runner& run : kRunners) {
        const bool threaded = run.fn != ctp::run_serial;
        for (int with_bias = 0; with_bias < 2; ++with_bias) {
          std::vector<float> y(M * N, nan);
          ctp::int4_linear(isa, view, x.data(), M, with_bias ? bias.data() : nullptr, y.data(), run.fn);
          const char* fn = with_bias ? "int4_linear(bias)" : "int4_linear(no bias)";
          std::string err = compare(y, with_bias ? yb_ref : y_ref, with_bias ? yb_mag : y_mag, N);
          check(err.empty(), describe(isa, w, M, fn, run.name) + ": " + err);
          if (!threaded) serial_y[with_bias] = y;
          else check(same_bits(y, serial_y[with_bias]),
                     describe(isa, w, M, fn, run.name) + ": threaded result differs bitwise from serial");
        }
        std::vector<float> gx(M * K, nan);
        ctp::int4_linear_grad_input(isa, view, gy.data(), M, gx.data(), run.fn);
        std::string err = compare(gx, gx_ref, gx_mag, K);
        check(err.empty(), describe(isa, w, M, "int4_linear_grad_input", run.name) + ": " + err);
        if (!threaded) serial_gx = gx;
        else check(same_bits(gx, serial_gx), describe(isa, w, M, "int4_linear_grad_input", run.name) +
                                                 ": threaded result differs bitwise from serial");
      }
    }
  }
}

void test_isa_names() {
  const ctp::Isa all[] = {ctp::Isa::scalar, ctp::Isa::avx2, ctp::Isa::avx512};
  for (ctp::Isa isa : all) {
    ctp::Isa back = ctp::Isa::scalar;
    check(ctp::isa_from_name(ctp::isa_name(isa), &back) && back == isa,
          std::string("isa_from_name(isa_name(") + ctp::isa_name(isa) + ")) round trip");
  }
  ctp::Isa dummy;
  check(!ctp::isa_from_name("no-such-isa", &dummy), "isa_from_name rejects an unknown name");
  check(ctp::isa_supported(ctp::best_isa()), "best_isa() is supported");
  check(ctp::isa_supported(ctp::Isa::scalar), "scalar is always supported");
}

}  // namespace

int main() {
  const char* quick_env = std::getenv("CTP_TEST_QUICK");
  const bool quick = quick_env && *quick_env && std::strcmp(quick_env, "0") != 0;

  std::vector<ctp::Isa> isas;
  for (ctp::Isa isa : {ctp::Isa::scalar, ctp::Isa::avx2, ctp::Isa::avx512}) {
    if (ctp::isa_supported(isa)) isas.push_back(isa);
    else std::printf("skipping isa %s: not supported by this CPU\n", ctp::isa_name(isa));
  }
  std::printf("testing isas:");
  for (ctp::Isa isa : isas) std::printf(" %s", ctp::isa_name(isa));
  std::printf("%s\n", quick ? " (CTP_TEST_QUICK: reduced sweep)" : "");

  test_isa_names();

  const std::vector<int64_t> Ms = quick ? std::vector<int64_t>{1, 3, 7, 33}
                                        : std::vector<int64_t>{1, 2, 3, 5, 7, 16, 33};
  const int64_t shapes[][2] = {{32, 32}, {33, 40}, {64, 100}, {96, 576}, {200, 129}};
  const ctp::ScaleType scale_types[] = {ctp::ScaleType::f32, ctp::ScaleType::f16, ctp::ScaleType::bf16};

  Rng rng(12345);
  int configs = 0;
  for (const auto& nk : shapes) {
    const int64_t N = nk[0], K = nk[1];
    std::vector<int64_t> groups;
    for (int64_t gs : {int64_t(32), int64_t(64), int64_t(128), K}) {
      bool dup = false;
      for (int64_t g : groups) dup |= g == gs;
      if (!dup) groups.push_back(gs);
    }
    for (int64_t gs : groups)
      for (int asym = 0; asym < 2; ++asym)
        for (int permuted = 0; permuted < 2; ++permuted)
          for (ctp::ScaleType st : scale_types) {
            Weight w = make_weight(rng, N, K, gs, st, asym != 0, permuted != 0);
            test_weight(rng, w, Ms, isas);
            ++configs;
          }
  }
  std::printf("%d weight configurations x %zu values of M x %zu isas\n", configs, Ms.size(), isas.size());
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
