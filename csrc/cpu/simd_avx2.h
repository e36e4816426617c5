// AVX2 + FMA + F16C vector of 8 floats. Included only by int4_avx2.cpp (compiled for that target).
#pragma once
#include <immintrin.h>
#include <cstdint>

struct VecAvx2 {
  static constexpr int W = 8;
  static constexpr int MR = 6;       // 6 x 16 micro-kernel: 12 accumulators + 2 B + 1 broadcast
  static constexpr int NRV = 2;
  static constexpr int GEMV_MR = 2;
  static constexpr int MR24 = 4;     // 2:4 micro-kernel rows (not run while S24_MICRO is false)
  // 2:4 forward at larger M through dense panels: here the permute micro-kernel ran slower than dense
  // int4 (M=512: 0.87-0.88x on an Intel Xeon, 0.94-1.05x on Zen 3)
  static constexpr bool S24_MICRO = false;
  using F = __m256;
  using I = __m256i;
  static uint64_t pdep(uint64_t src, uint64_t mask) { return _pdep_u64(src, mask); }
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static I load_i(const float* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void store_i(float* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static F bcast(float v) { return _mm256_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static I load_u8(const uint8_t* p) {  // 8 bytes -> 8 int32 lanes
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static I load_s8(const uint8_t* p) {  // 8 bytes -> 8 sign-extended int32 lanes
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  // Bytes o..o+7 of little-endian words q (o a multiple of 8), built in registers (see simd_avx512.h).
  static I words_u8(const uint64_t* q, int o) { return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(q[o / 8]))); }
  static I words_s8(const uint64_t* q, int o) { return _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(int64_t(q[o / 8]))); }
  static I sll(I v, int n) { return _mm256_slli_epi32(v, n); }
  static I sra(I v, int n) { return _mm256_srai_epi32(v, n); }
  static F low_nibble(I v) { return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))); }
  static F byte_float(I v) { return _mm256_cvtepi32_ps(v); }
  static F high_nibble(I v) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)); }
  static I srl(I v, int n) { return _mm256_srli_epi32(v, n); }
  static I and_(I v, int m) { return _mm256_and_si256(v, _mm256_set1_epi32(m)); }
  static F select_eq(I idx, int c, F val) {
    return _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(idx, _mm256_set1_epi32(c))), val);
  }
  using T4 = __m256;  // 4 floats repeated in each 128-bit lane
  static T4 table4(const float* p) { return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)); }
  static F permute4(T4 t, I idx) { return _mm256_permutevar_ps(t, idx); }  // uses idx & 3
  // No 16-entry float table (V::lookup16): two 8-entry permutes and a blend made the 2:4 M=1 kernel
  // slower (0.84x of dense int4 against 0.92x with converts, 4096x4096, one Zen 4 core).
  static constexpr bool LUT16 = false;
  static F load_u8_float(const uint8_t* p) { return _mm256_cvtepi32_ps(load_u8(p)); }
  static F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F load_bf16(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
};
