// Self-contained test of the CPU packed-weight kernels (csrc/cpu/qlinear.h): no torch, no gtest.
//
// For every layout (dense 3/4/8-bit, 2:4 sparse, unstructured sparse at several sparsities) builds
// random codes and masks, scales (f32 / f16 / bf16), optional uint8 zeros and an optional act-order
// permutation, packs them into the byte layout documented in qlinear.h, and compares ctp::linear and
// ctp::linear_grad_input against a double-precision reference for every instruction set this CPU
// supports, run serially and on two threads (the threaded result must match the serial one bitwise).
// Also checks that ctp::check_view accepts every packed weight and rejects malformed views.
//
// Exit status is non-zero on any failure; the last line is "N passed, M failed".
// CTP_TEST_QUICK=1 in the environment runs a reduced sweep.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "qlinear.h"

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

// ---------------------------------------------------------------- layouts under test
struct Format {
  ctp::Layout layout;
  int bits;
  int sparsity;  // unstructured only: percent of the weights pruned (0, 50, 90 or 100)
};

std::string format_name(const Format& f) {
  char buf[64];
  switch (f.layout) {
    case ctp::Layout::dense: std::snprintf(buf, sizeof buf, "dense%d", f.bits); break;
    case ctp::Layout::sparse24: std::snprintf(buf, sizeof buf, "sparse24"); break;
    default: std::snprintf(buf, sizeof buf, "unstructured(%d%% pruned)", f.sparsity); break;
  }
  return buf;
}

// ---------------------------------------------------------------- a packed weight
struct Weight {
  Format fmt;
  int64_t N, K, gs, G, nb;
  ctp::ScaleType st;
  bool asym, permuted;
  std::vector<uint8_t> q;        // [nb * 32][K] codes in packed column order (padding rows too)
  std::vector<uint8_t> keep;     // [nb * 32][K] 1 where the weight is stored (kept), packed column order
  std::vector<float> scale;      // [nb * 32][G] scale values exactly as the kernel decodes them
  std::vector<uint8_t> zero;     // [nb * 32][G]
  std::vector<int64_t> perm;     // [K] packed column k holds original column perm[k]
  // packed buffers, each allocated to its exact size so that the sanitizer sees any overread
  std::vector<uint8_t> codes;
  std::unique_ptr<uint8_t[]> no_codes;  // a non-null, zero-length code buffer (all pruned)
  std::vector<uint32_t> masks;   // [nb][K] (unstructured)
  std::vector<int64_t> offsets;  // [nb][ceil(K / 32)] (unstructured)
  std::vector<float> scales_f32;
  std::vector<uint16_t> scales_u16;
  std::vector<uint8_t> zeros;    // [nb][G][32]
  std::vector<double> dense;     // [N][K] reference W in original column order

  ctp::QView view() const {
    ctp::QView v;
    v.layout = fmt.layout;
    v.bits = fmt.bits;
    v.codes = codes.empty() ? no_codes.get() : codes.data();
    const bool unstructured = fmt.layout == ctp::Layout::unstructured;
    v.masks = unstructured ? masks.data() : nullptr;
    v.offsets = unstructured ? offsets.data() : nullptr;
    v.scales = st == ctp::ScaleType::f32 ? static_cast<const void*>(scales_f32.data())
                                         : static_cast<const void*>(scales_u16.data());
    v.zeros = asym ? zeros.data() : nullptr;
    v.perm = permuted ? perm.data() : nullptr;
    v.N = N;
    v.K = K;
    v.group_size = gs;
    v.scale_type = st;
    v.codes_bytes = int64_t(codes.size());
    return v;
  }
};

Weight make_weight(Rng& rng, const Format& fmt, int64_t N, int64_t K, int64_t gs, ctp::ScaleType st, bool asym,
                   bool permuted) {
  Weight w;
  w.fmt = fmt;
  w.N = N, w.K = K, w.gs = gs, w.G = (K + gs - 1) / gs, w.nb = (N + 31) / 32;
  w.st = st, w.asym = asym, w.permuted = permuted;
  const int64_t rows = w.nb * 32, G = w.G;
  const int levels = 1 << fmt.bits;  // codes are 0 .. levels - 1

  // Random scales and zeros for every row, padding rows included (their output is never stored,
  // so random values there check that they do not leak into real rows).
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
        uint8_t z = asym ? uint8_t(rng.below(levels)) : uint8_t(levels / 2);
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

  // Random codes; which of them are kept depends on the layout.
  w.q.resize(rows * K);
  for (auto& c : w.q) c = uint8_t(rng.below(levels));
  w.keep.assign(rows * K, 0);

  if (fmt.layout == ctp::Layout::dense) {
    std::fill(w.keep.begin(), w.keep.end(), uint8_t(1));
    const int bytes = 4 * fmt.bits;  // per (block, column)
    w.codes.assign(w.nb * K * bytes, 0);
    for (int64_t b = 0; b < w.nb; ++b)
      for (int64_t k = 0; k < K; ++k) {
        uint8_t* col = &w.codes[(b * K + k) * bytes];
        for (int i = 0; i < 32; ++i) {
          const unsigned c = w.q[(b * 32 + i) * K + k];
          if (fmt.bits == 4) col[i % 16] |= uint8_t(c << (i < 16 ? 0 : 4));  // row 16 + j: high nibble
          else if (fmt.bits == 8) col[i] = uint8_t(c);
          else  // 96-bit little-endian stream, row i at bits 3i .. 3i + 2
            for (int t = 0; t < 3; ++t)
              if ((c >> t) & 1) col[(3 * i + t) / 8] |= uint8_t(1u << ((3 * i + t) % 8));
        }
      }
  } else if (fmt.layout == ctp::Layout::sparse24) {
    // Per row and quad: 0, 1 or 2 kept weights at random distinct positions. Each of the two slots
    // holds a position; a slot without a kept weight (filler) holds the zero point of the row's
    // group as its code, at a position different from the other slot's.
    const int64_t Q = K / 4;
    std::vector<uint8_t> slot_code(rows * Q * 2), slot_pos(rows * Q * 2);
    for (int64_t n = 0; n < rows; ++n)
      for (int64_t j = 0; j < Q; ++j) {
        const int r = rng.below(6), nkeep = r < 1 ? 0 : r < 3 ? 1 : 2;
        int pos[4] = {0, 1, 2, 3};
        for (int t = 0; t < 2; ++t) std::swap(pos[t], pos[t + rng.below(4 - t)]);
        const int first = rng.below(2);  // which slot gets pos[0]: slot order is arbitrary
        for (int t = 0; t < 2; ++t) {
          const int slot = t ^ first, k = int(4 * j) + pos[t];
          uint8_t code;
          if (t < nkeep) {
            code = w.q[n * K + k];
            w.keep[n * K + k] = 1;
          } else {
            code = w.zero[n * G + k / gs];
          }
          slot_code[(n * Q + j) * 2 + slot] = code;
          slot_pos[(n * Q + j) * 2 + slot] = uint8_t(pos[t]);
        }
      }
    w.codes.assign(w.nb * Q * 48, 0);
    for (int64_t b = 0; b < w.nb; ++b)
      for (int64_t j = 0; j < Q; ++j) {
        uint8_t* p = &w.codes[(b * Q + j) * 48];
        for (int i = 0; i < 16; ++i) {
          const int64_t lo = ((b * 32 + i) * Q + j) * 2, hi = ((b * 32 + 16 + i) * Q + j) * 2;
          for (int slot = 0; slot < 2; ++slot)
            p[16 * slot + i] = uint8_t(slot_code[lo + slot] | slot_code[hi + slot] << 4);
          p[32 + i] = uint8_t(slot_pos[lo] | slot_pos[lo + 1] << 2 | slot_pos[hi] << 4 | slot_pos[hi + 1] << 6);
        }
      }
  } else {
    // Unstructured: each real row keeps a weight with probability 1 - sparsity (padding rows keep
    // none). At 50% and 90% one row is pruned entirely and, where there are two blocks or more, one
    // block is kept entirely.
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) w.keep[n * K + k] = rng.below(100) >= fmt.sparsity;
    if (fmt.sparsity > 0 && fmt.sparsity < 100) {
      int64_t dense_block = -1;
      if (w.nb >= 2) {
        dense_block = rng.below(int(w.nb));
        for (int64_t n = dense_block * 32; n < std::min(N, dense_block * 32 + 32); ++n)
          for (int64_t k = 0; k < K; ++k) w.keep[n * K + k] = 1;
      }
      int64_t empty_row;
      do empty_row = rng.below(int(N));
      while (empty_row / 32 == dense_block);
      for (int64_t k = 0; k < K; ++k) w.keep[empty_row * K + k] = 0;
    }
    // Layout version 2 (csrc/cpu/qlinear.h): rows in nibble order (p = 2j: row j, p = 2j+1: row 16+j);
    // per column and half, the kept codes XOR their zero point, two per byte, the half padded to a
    // byte with junk; 8 junk bytes after the stream (the kernels may load them, never use them).
    const int64_t nchunks = (K + 31) / 32;
    w.masks.assign(w.nb * K, 0);
    w.offsets.assign(w.nb * nchunks, 0);
    std::vector<uint8_t> stream;
    for (int64_t b = 0; b < w.nb; ++b)
      for (int64_t k = 0; k < K; ++k) {
        if (k % 32 == 0) w.offsets[b * nchunks + k / 32] = int64_t(stream.size());
        for (int h = 0; h < 2; ++h) {
          int t = 0;
          for (int p = 16 * h; p < 16 * h + 16; ++p) {
            const int64_t n = b * 32 + (p & 1) * 16 + (p >> 1);
            if (!w.keep[n * K + k]) continue;
            w.masks[b * K + k] |= 1u << p;
            const uint8_t c = uint8_t(w.q[n * K + k] ^ w.zero[n * G + k / gs]);
            if (t % 2 == 0) stream.push_back(c);
            else stream.back() |= uint8_t(c << 4);
            ++t;
          }
          if (t % 2) stream.back() |= uint8_t(rng.below(16) << 4);  // padding nibble: junk
        }
      }
    for (int j = 0; j < 8; ++j) stream.push_back(uint8_t(rng.below(256)));
    w.codes = stream;
    if (w.codes.empty()) w.no_codes.reset(new uint8_t[0]);
  }

  // Reference dense weight: W[n][perm[k]] = kept ? (q[n][k] - zero) * scale : 0, group k / gs.
  w.dense.assign(N * K, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = k / gs;
      if (!w.keep[n * K + k]) continue;
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
  char buf[400];
  std::snprintf(buf, sizeof buf,
                "isa=%s fn=%s layout=%s M=%lld N=%lld K=%lld group=%lld%s scales=%s %s perm=%s run=%s",
                ctp::isa_name(isa), fn, format_name(w.fmt).c_str(), (long long)M, (long long)w.N, (long long)w.K,
                (long long)w.gs, w.gs == w.K ? "(per-channel)" : "", scale_name(w.st), w.asym ? "asym" : "sym",
                w.permuted ? "yes" : "no", runner);
  return buf;
}

// *dot = sum a[i] b[i], *mag = sum |a[i] b[i]|, in four chains (the reference is a hot loop).
void dot_mag(const double* a, const double* b, int64_t n, double* dot, double* mag) {
  double d0 = 0, d1 = 0, d2 = 0, d3 = 0, m0 = 0, m1 = 0, m2 = 0, m3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const double p0 = a[i] * b[i], p1 = a[i + 1] * b[i + 1], p2 = a[i + 2] * b[i + 2], p3 = a[i + 3] * b[i + 3];
    d0 += p0, d1 += p1, d2 += p2, d3 += p3;
    m0 += std::fabs(p0), m1 += std::fabs(p1), m2 += std::fabs(p2), m3 += std::fabs(p3);
  }
  for (; i < n; ++i) {
    const double p = a[i] * b[i];
    d0 += p, m0 += std::fabs(p);
  }
  *dot = (d0 + d1) + (d2 + d3);
  *mag = (m0 + m1) + (m2 + m3);
}

void test_weight(Rng& rng, const Weight& w, const std::vector<int64_t>& Ms, const std::vector<ctp::Isa>& isas) {
  const int64_t N = w.N, K = w.K;
  const ctp::QView view = w.view();
  const char* bad = ctp::check_view(view);
  check(!bad, describe(ctp::Isa::scalar, w, 0, "check_view", "-") + ": rejects a valid weight: " +
                  (bad ? bad : ""));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<double> wt(K * N);  // W transposed, for the grad_input reference
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) wt[k * N + n] = w.dense[n * K + k];
  for (int64_t M : Ms) {
    std::vector<float> x(M * K), gy(M * N), bias(N);
    for (auto& v : x) v = rng.uniform(-1.f, 1.f);
    for (auto& v : gy) v = rng.uniform(-1.f, 1.f);
    for (auto& v : bias) v = rng.uniform(-1.f, 1.f);

    // y = x W^T (+ bias), gx = gy W, in double; mag = sum |a| |w| per output.
    const std::vector<double> xd(x.begin(), x.end()), gyd(gy.begin(), gy.end());
    std::vector<double> y_ref(M * N), y_mag(M * N), yb_ref(M * N), yb_mag(M * N);
    std::vector<double> gx_ref(M * K), gx_mag(M * K);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        double acc, mag;
        dot_mag(&xd[m * K], &w.dense[n * K], K, &acc, &mag);
        y_ref[m * N + n] = acc, y_mag[m * N + n] = mag;
        yb_ref[m * N + n] = acc + bias[n], yb_mag[m * N + n] = mag + std::fabs(double(bias[n]));
      }
      for (int64_t k = 0; k < K; ++k) dot_mag(&gyd[m * N], &wt[k * N], N, &gx_ref[m * K + k], &gx_mag[m * K + k]);
    }

    for (ctp::Isa isa : isas) {
      std::vector<float> serial_y[2], serial_gx;  // serial results, to compare threaded runs bitwise
      for (const Runner& run : kRunners) {
        const bool threaded = run.fn != ctp::run_serial;
        for (int with_bias = 0; with_bias < 2; ++with_bias) {
          std::vector<float> y(M * N, nan);
          ctp::linear(isa, view, x.data(), M, with_bias ? bias.data() : nullptr, y.data(), run.fn);
          const char* fn = with_bias ? "linear(bias)" : "linear(no bias)";
          std::string err = compare(y, with_bias ? yb_ref : y_ref, with_bias ? yb_mag : y_mag, N);
          check(err.empty(), describe(isa, w, M, fn, run.name) + ": " + err);
          if (!threaded) serial_y[with_bias] = y;
          else check(same_bits(y, serial_y[with_bias]),
                     describe(isa, w, M, fn, run.name) + ": threaded result differs bitwise from serial");
        }
        std::vector<float> gx(M * K, nan);
        ctp::linear_grad_input(isa, view, gy.data(), M, gx.data(), run.fn);
        std::string err = compare(gx, gx_ref, gx_mag, K);
        check(err.empty(), describe(isa, w, M, "linear_grad_input", run.name) + ": " + err);
        if (!threaded) serial_gx = gx;
        else check(same_bits(gx, serial_gx), describe(isa, w, M, "linear_grad_input", run.name) +
                                                 ": threaded result differs bitwise from serial");
      }
    }
  }
}

// bf16 as the kernels and torch round (to nearest even; no NaNs here).
uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
double from_bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The bf16 dot-product path (linear_bf16 / linear_grad_input_bf16, where bf16_gemm): bf16 activations times
// W rounded to bf16 from its fp32 value, fp32 accumulation. The reference rounds the same way, in double.
void test_weight_bf16(Rng& rng, const Weight& w, const std::vector<int64_t>& Ms) {
  if (!ctp::isa_supported(ctp::Isa::avx512bf16)) return;
  const int64_t N = w.N, K = w.K;
  const ctp::QView view = w.view();
  std::vector<double> wb(N * K), wbt(K * N);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) wb[n * K + k] = wbt[k * N + n] = from_bf16(to_bf16(float(w.dense[n * K + k])));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t M : Ms) {
    if (!ctp::bf16_gemm(ctp::Isa::avx512bf16, M)) continue;
    std::vector<uint16_t> x(M * K), gy(M * N);
    std::vector<double> xd(M * K), gyd(M * N);
    std::vector<float> bias(N);
    for (int64_t i = 0; i < M * K; ++i) x[i] = to_bf16(rng.uniform(-1.f, 1.f)), xd[i] = from_bf16(x[i]);
    for (int64_t i = 0; i < M * N; ++i) gy[i] = to_bf16(rng.uniform(-1.f, 1.f)), gyd[i] = from_bf16(gy[i]);
    for (auto& v : bias) v = rng.uniform(-1.f, 1.f);
    std::vector<double> y_ref(M * N), y_mag(M * N), gx_ref(M * K), gx_mag(M * K);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        dot_mag(&xd[m * K], &wb[n * K], K, &y_ref[m * N + n], &y_mag[m * N + n]);
        y_ref[m * N + n] += bias[n], y_mag[m * N + n] += std::fabs(double(bias[n]));
      }
      for (int64_t k = 0; k < K; ++k) dot_mag(&gyd[m * N], &wbt[k * N], N, &gx_ref[m * K + k], &gx_mag[m * K + k]);
    }
    std::vector<float> serial_y, serial_gx;
    for (const Runner& run : kRunners) {
      std::vector<float> y(M * N, nan), gx(M * K, nan);
      ctp::linear_bf16(view, x.data(), M, bias.data(), y.data(), run.fn);
      ctp::linear_grad_input_bf16(view, gy.data(), M, gx.data(), run.fn);
      const ctp::Isa isa = ctp::Isa::avx512bf16;
      std::string err = compare(y, y_ref, y_mag, N);
      check(err.empty(), describe(isa, w, M, "linear_bf16", run.name) + ": " + err);
      err = compare(gx, gx_ref, gx_mag, K);
      check(err.empty(), describe(isa, w, M, "linear_grad_input_bf16", run.name) + ": " + err);
      if (run.fn == ctp::run_serial) {
        serial_y = y, serial_gx = gx;
      } else {
        check(same_bits(y, serial_y) && same_bits(gx, serial_gx),
              describe(isa, w, M, "bf16", run.name) + ": threaded result differs bitwise from serial");
      }
    }
  }
}

void test_isa_names() {
  const ctp::Isa all[] = {ctp::Isa::scalar, ctp::Isa::avx2, ctp::Isa::avx512, ctp::Isa::avx512bf16};
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

// check_view: null for usable views, a message for each broken constraint.
void test_check_view(Rng& rng) {
  using ctp::Layout;
  const Weight d = make_weight(rng, Format{Layout::dense, 4, 0}, 40, 64, 32, ctp::ScaleType::f16, false, false);
  const Weight s = make_weight(rng, Format{Layout::sparse24, 4, 0}, 40, 64, 32, ctp::ScaleType::f16, true, false);
  const Weight u = make_weight(rng, Format{Layout::unstructured, 4, 50}, 40, 64, 32, ctp::ScaleType::f16, false, true);
  struct Case {
    const char* what;
    ctp::QView v;
    bool good;
  };
  std::vector<Case> cases;
  ctp::QView v;
  cases.push_back({"dense bits 4", d.view(), true});
  v = d.view(), v.bits = 3, cases.push_back({"dense bits 3", v, true});
  v = d.view(), v.bits = 8, cases.push_back({"dense bits 8", v, true});
  v = d.view(), v.perm = d.perm.data(), cases.push_back({"dense with perm", v, true});
  cases.push_back({"sparse24", s.view(), true});
  cases.push_back({"unstructured with perm", u.view(), true});
  v = d.view(), v.bits = 5, cases.push_back({"dense bits 5", v, false});
  v = d.view(), v.bits = 2, cases.push_back({"dense bits 2", v, false});
  v = s.view(), v.K = 62, cases.push_back({"sparse24 with K % 4 != 0", v, false});
  v = s.view(), v.perm = d.perm.data(), cases.push_back({"sparse24 with perm", v, false});
  v = s.view(), v.group_size = 30, cases.push_back({"sparse24 with group size 30", v, false});
  v = s.view(), v.bits = 3, cases.push_back({"sparse24 bits 3", v, false});
  v = u.view(), v.masks = nullptr, cases.push_back({"unstructured without masks", v, false});
  v = u.view(), v.offsets = nullptr, cases.push_back({"unstructured without offsets", v, false});
  v = u.view(), v.bits = 8, cases.push_back({"unstructured bits 8", v, false});
  v = d.view(), v.N = 0, cases.push_back({"N = 0", v, false});
  v = d.view(), v.K = 0, cases.push_back({"K = 0", v, false});
  v = d.view(), v.group_size = 0, cases.push_back({"group size 0", v, false});
  v = d.view(), v.codes = nullptr, cases.push_back({"no codes", v, false});
  v = d.view(), v.scales = nullptr, cases.push_back({"no scales", v, false});
  for (const Case& c : cases) {
    const char* msg = ctp::check_view(c.v);
    if (c.good) check(msg == nullptr, std::string("check_view accepts ") + c.what + ", got: " + (msg ? msg : ""));
    else check(msg != nullptr && *msg, std::string("check_view rejects ") + c.what);
  }
}

// Unstructured masks that disagree with offsets: check_unstructured names them, and every kernel (small M,
// forward tiles, grad_input tiles) reports them through QView::error without reading past the stream.
void test_unstructured_disagreement(Rng& rng, const std::vector<ctp::Isa>& isas) {
  using ctp::Layout;
  const Weight u = make_weight(rng, Format{Layout::unstructured, 4, 50}, 70, 300, 32, ctp::ScaleType::f16, true, false);
  check(ctp::check_unstructured(u.view()) == nullptr, "check_unstructured accepts a well-formed weight");
  std::vector<uint32_t> more = u.masks;
  for (uint32_t& m : more) m |= 0x0000FFFFu;  // rows 0..7 and 16..23 (the low half) kept everywhere: more codes
  std::vector<uint32_t> fewer = u.masks;
  fewer[3] = 0;  // block 0, column 3 keeps nothing: the codes after it shift
  struct Bad { const char* what; const std::vector<uint32_t>* masks; };
  for (const Bad& bad : {Bad{"masks keeping more codes than the stream", &more}, Bad{"masks keeping fewer codes", &fewer}}) {
    ctp::QView v = u.view();
    v.masks = bad.masks->data();
    const char* msg = ctp::check_unstructured(v);
    check(msg != nullptr, std::string("check_unstructured rejects ") + bad.what);
    for (ctp::Isa isa : isas)
      for (int64_t M : {int64_t(1), int64_t(9)}) {
        ctp::KernelError err;
        v.error = &err;
        std::vector<float> x(M * std::max(v.N, v.K), 0.5f), y(M * std::max(v.N, v.K));
        ctp::linear(isa, v, x.data(), M, nullptr, y.data());
        check(err.set == 1, std::string("linear reports ") + bad.what + " on " + ctp::isa_name(isa) + " M=" + std::to_string(M));
        ctp::KernelError gerr;
        v.error = &gerr;
        ctp::linear_grad_input(isa, v, x.data(), M, y.data());
        check(gerr.set == 1, std::string("grad_input reports ") + bad.what + " on " + ctp::isa_name(isa));
      }
  }
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
  std::printf(ctp::isa_supported(ctp::Isa::avx512bf16) ? " + avx512bf16 (bf16 activations)"
                                                        : "; skipping avx512bf16: not supported by this CPU");
  std::printf("%s\n", quick ? " (CTP_TEST_QUICK: reduced sweep)" : "");

  Rng rng(12345);
  test_isa_names();
  test_check_view(rng);
  Rng rng_bad(777);  // its own stream: the sweep below keeps its weights
  test_unstructured_disagreement(rng_bad, isas);

  // M <= 4 takes the small-M kernels (rows in pairs on AVX2, fours on AVX-512), larger M the tiled ones
  // (micro-kernel rows: 4 scalar, 6 AVX2, 8 AVX-512; M = 33 also splits the rows into two tasks on scalar).
  const std::vector<int64_t> Ms = quick ? std::vector<int64_t>{1, 3, 7, 33}
                                        : std::vector<int64_t>{1, 3, 4, 5, 7, 10, 33};
  // Partial last blocks, K past one forward tile (256) and one grad tile (128), N past one grad tile (256).
  const int64_t shapes[][2] = {{32, 32}, {33, 40}, {64, 100}, {96, 264}, {200, 129}, {264, 68}};
  const ctp::ScaleType scale_types[] = {ctp::ScaleType::f32, ctp::ScaleType::f16, ctp::ScaleType::bf16};
  using ctp::Layout;
  const Format formats[] = {{Layout::dense, 4, 0},        {Layout::dense, 3, 0},
                            {Layout::dense, 8, 0},        {Layout::sparse24, 4, 0},
                            {Layout::unstructured, 4, 0}, {Layout::unstructured, 4, 50},
                            {Layout::unstructured, 4, 90}, {Layout::unstructured, 4, 100}};

  int configs = 0, rotation = 0;
  for (const Format& fmt : formats) {
    const bool s24 = fmt.layout == Layout::sparse24;
    int fmt_configs = 0;
    for (const auto& nk : shapes) {
      const int64_t N = nk[0], K = nk[1];
      if (s24 && K % 4) continue;  // 2:4 needs whole quads
      // Group sizes up to K, per channel included; 20 straddles the 32-column chunks.
      std::vector<int64_t> groups;
      for (int64_t gs : {int64_t(20), int64_t(32), int64_t(128), K}) {
        bool dup = gs > K;
        for (int64_t g : groups) dup |= g == gs;
        if (!dup && !(s24 && gs % 4)) groups.push_back(gs);
      }
      for (int64_t gs : groups)
        for (int asym = 0; asym < 2; ++asym)
          for (int permuted = 0; permuted < (s24 ? 1 : 2); ++permuted) {
            // The scale types take turns: over consecutive group sizes each (zeros, perm) pair of a
            // layout meets all three.
            const ctp::ScaleType turn = scale_types[rotation++ % 3];
            for (ctp::ScaleType st : scale_types) {
              if (st != turn) continue;
              Weight w = make_weight(rng, fmt, N, K, gs, st, asym != 0, permuted != 0);
              test_weight(rng, w, Ms, isas);
              test_weight_bf16(rng, w, Ms);
              ++configs, ++fmt_configs;
            }
          }
    }
    std::printf("%-26s %3d weight configurations\n", format_name(fmt).c_str(), fmt_configs);
    std::fflush(stdout);
  }
  std::printf("%d weight configurations x %zu values of M x %zu isas\n", configs, Ms.size(), isas.size());
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
