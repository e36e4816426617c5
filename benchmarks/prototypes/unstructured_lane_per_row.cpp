// Prototype (not part of the library): a lane-per-row layout for unstructured int4 at M = 1 (issue 3),
// built to measure whether any layout can reach the M = 1 targets before building it for real.
//
// Layout: tiles of 64 rows x 32 columns; per tile one byte `pairs` (= ceil(max kept per row / 2)), the
// rows' 32-bit masks bit-reversed (bit 31 - j = column j), then per pair of steps 64 bytes: row r's
// kept code number 2t in the low nibble, 2t + 1 in the high one, padded with code 8 (value 0).
// Kernel, per step and 16 rows: vplzcntd gives each row's next kept column, vpermt2ps picks x there,
// vpsrlvd + vpxord clear that bit, vpermps maps the code to a float, one FMA: 7 vector uops for 16
// weights, and 512-bit vector work has only ports 0 and 5. Four 16-row chains hide the lzcnt latency.
//
// Build and run with the library's kernels beside it: bash benchmarks/prototypes/lane_per_row.sh
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s N K sparsity   (N a multiple of 64, K of 64)\n", argv[0]);
    return 2;
  }
  const int N = atoi(argv[1]), K = atoi(argv[2]), G = 64;
  const double sp = atof(argv[3]);
  if (N % 64 || K % 64 || N <= 0 || K <= 0) {
    fprintf(stderr, "N must be a positive multiple of 64 and K of 64\n");
    return 2;
  }
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> U(0, 1);
  std::vector<uint8_t> q(size_t(N) * K); std::vector<uint8_t> keep(size_t(N) * K);
  for (size_t i = 0; i < q.size(); ++i) { q[i] = rng() & 15; keep[i] = U(rng) >= sp; }
  std::vector<float> s(size_t(N) * (K / G)); for (auto& v : s) v = 0.01f + U(rng) * 0.01f;
  std::vector<float> x(K); for (auto& v : x) v = U(rng) - 0.5f;
  // pack
  std::vector<uint8_t> stream; std::vector<int64_t> strip_off(N / 64 + 1);
  size_t padded = 0, kept = 0;
  for (int sb = 0; sb < N / 64; ++sb) {
    strip_off[sb] = stream.size();
    for (int kb = 0; kb < K / 32; ++kb) {
      int steps = 0; std::vector<std::vector<uint8_t>> rc(64);
      uint32_t masks[64];
      for (int r = 0; r < 64; ++r) {
        uint32_t m = 0; size_t row = size_t(sb * 64 + r) * K;
        for (int j = 0; j < 32; ++j) if (keep[row + kb * 32 + j]) { m |= 1u << (31 - j); rc[r].push_back(q[row + kb * 32 + j]); }
        masks[r] = m; steps = std::max(steps, (int)rc[r].size()); kept += rc[r].size();
      }
      int pairs = (steps + 1) / 2; padded += size_t(pairs) * 2 * 64;
      stream.push_back(uint8_t(pairs));
      for (int r = 0; r < 64; ++r) for (int b = 0; b < 4; ++b) stream.push_back((masks[r] >> (8 * b)) & 255);
      for (int t = 0; t < pairs; ++t) for (int r = 0; r < 64; ++r) {
        uint8_t lo = 2 * t < (int)rc[r].size() ? rc[r][2 * t] : 8, hi = 2 * t + 1 < (int)rc[r].size() ? rc[r][2 * t + 1] : 8;
        stream.push_back(lo | (hi << 4));
      }
    }
  }
  strip_off[N / 64] = stream.size();
  std::vector<float> y(N), yr(N);
  // reference
  for (int n = 0; n < N; ++n) { double a = 0; for (int k = 0; k < K; ++k) if (keep[size_t(n) * K + k]) a += double(s[size_t(n) * (K / G) + k / G]) * (q[size_t(n) * K + k] - 8) * x[k]; yr[n] = a; }
  alignas(64) static const float lutv[16] = {-8,-7,-6,-5,-4,-3,-2,-1,0,1,2,3,4,5,6,7};
  // scales transposed per strip: [sb][g][64]
  std::vector<float> st(s.size());
  for (int n = 0; n < N; ++n) for (int g = 0; g < K / G; ++g) st[(size_t(n / 64) * (K / G) + g) * 64 + n % 64] = s[size_t(n) * (K / G) + g];
  auto run = [&]() {
    const __m512 lut = _mm512_load_ps(lutv);
    const __m512i top = _mm512_set1_epi32(int(0x80000000u));
    for (int sb = 0; sb < N / 64; ++sb) {
      const uint8_t* p = stream.data() + strip_off[sb];
      __m512 y0 = _mm512_setzero_ps(), y1 = y0, y2 = y0, y3 = y0;
      for (int kb = 0; kb < K / 32; kb += 2) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int h = 0; h < 2; ++h) {
          const __m512 xl = _mm512_loadu_ps(&x[(kb + h) * 32]), xh = _mm512_loadu_ps(&x[(kb + h) * 32 + 16]);
          int pairs = *p++;
          __m512i m0 = _mm512_loadu_si512(p), m1 = _mm512_loadu_si512(p + 64), m2 = _mm512_loadu_si512(p + 128), m3 = _mm512_loadu_si512(p + 192);
          p += 256;
#define STEP(m, a, cb) { __m512i lz = _mm512_lzcnt_epi32(m); __m512 xs = _mm512_permutex2var_ps(xl, lz, xh); \
  m = _mm512_xor_si512(m, _mm512_srlv_epi32(top, lz)); a = _mm512_fmadd_ps(_mm512_permutexvar_ps(cb, lut), xs, a); }
          for (int t = 0; t < pairs; ++t, p += 64) {
            __m512i c0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)), c1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 16)));
            __m512i c2 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 32))), c3 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 48)));
            STEP(m0, a0, c0) STEP(m1, a1, c1) STEP(m2, a2, c2) STEP(m3, a3, c3)
            c0 = _mm512_srli_epi32(c0, 4); c1 = _mm512_srli_epi32(c1, 4); c2 = _mm512_srli_epi32(c2, 4); c3 = _mm512_srli_epi32(c3, 4);
            STEP(m0, a0, c0) STEP(m1, a1, c1) STEP(m2, a2, c2) STEP(m3, a3, c3)
          }
        }
        const float* sc = &st[(size_t(sb) * (K / G) + kb / 2) * 64];
        y0 = _mm512_fmadd_ps(_mm512_loadu_ps(sc), a0, y0); y1 = _mm512_fmadd_ps(_mm512_loadu_ps(sc + 16), a1, y1);
        y2 = _mm512_fmadd_ps(_mm512_loadu_ps(sc + 32), a2, y2); y3 = _mm512_fmadd_ps(_mm512_loadu_ps(sc + 48), a3, y3);
      }
      _mm512_storeu_ps(&y[sb * 64], y0); _mm512_storeu_ps(&y[sb * 64 + 16], y1); _mm512_storeu_ps(&y[sb * 64 + 32], y2); _mm512_storeu_ps(&y[sb * 64 + 48], y3);
    }
  };
  run();
  double err = 0, ref = 0; for (int n = 0; n < N; ++n) { err = std::max(err, (double)std::fabs(y[n] - yr[n])); ref = std::max(ref, (double)std::fabs(yr[n])); }
  std::vector<double> ts;
  for (int it = 0; it < 50; ++it) { auto t0 = std::chrono::steady_clock::now(); run(); ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count()); }
  std::sort(ts.begin(), ts.end());
  size_t bytes = stream.size() + s.size() * 2;  // scales as fp16 in a real format
  printf("N=%d K=%d sparsity=%.2f  median %.3f ms (1 thread)  bytes/weight %.3f (codes+masks %.3f)  pad %.2f  maxerr %.2e / %.2e\n",
         N, K, sp, ts[ts.size() / 2], double(bytes) / (double(N) * K), double(stream.size()) / (double(N) * K), double(padded) / kept, err, ref);
}
