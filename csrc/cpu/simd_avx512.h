// AVX-512 (F, BW, VL) vector of 16 floats. Included only by int4_avx512.cpp.
#pragma once
#include <immintrin.h>
#include <cstdint>

struct VecAvx512 {
  static constexpr int W = 16;
  static constexpr int MR = 8;       // 8 x 32 micro-kernel: 16 accumulators of 32 registers
  static constexpr int NRV = 2;
  static constexpr int GEMV_MR = 4;
  static constexpr int MR24 = 8;     // 2:4 micro-kernel rows
  // 2:4 forward at larger M: the permute micro-kernel (1.20-1.22x of dense int4 at M=512)
  static constexpr bool S24_MICRO = true;
  using F = __m512;
  using I = __m512i;
  static uint64_t pdep(uint64_t src, uint64_t mask) { return _pdep_u64(src, mask); }
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static I load_i(const float* p) { return _mm512_loadu_si512(p); }
  static void store_i(float* p, I v) { _mm512_storeu_si512(p, v); }
  static F bcast(float v) { return _mm512_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static I load_u8(const uint8_t* p) {  // 16 bytes -> 16 int32 lanes
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static I load_s8(const uint8_t* p) {  // 16 bytes -> 16 sign-extended int32 lanes
    return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // Bytes o..o+15 of little-endian words q (o a multiple of 16), built in registers: a vector load of
  // bytes just stored as two 8-byte halves fails store forwarding (see qlinear_impl.h, WordBytes).
  static I words_u8(const uint64_t* q, int o) {
    return _mm512_cvtepu8_epi32(_mm_set_epi64x(int64_t(q[o / 8 + 1]), int64_t(q[o / 8])));
  }
  static I words_s8(const uint64_t* q, int o) {
    return _mm512_cvtepi8_epi32(_mm_set_epi64x(int64_t(q[o / 8 + 1]), int64_t(q[o / 8])));
  }
  static I sll(I v, int n) { return _mm512_slli_epi32(v, n); }
  static I sra(I v, int n) { return _mm512_srai_epi32(v, n); }
  static F low_nibble(I v) { return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))); }
  static F byte_float(I v) { return _mm512_cvtepi32_ps(v); }
  static F high_nibble(I v) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)); }
  static I srl(I v, int n) { return _mm512_srli_epi32(v, n); }
  static I and_(I v, int m) { return _mm512_and_si512(v, _mm512_set1_epi32(m)); }
  static F select_eq(I idx, int c, F val) {
    return _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(idx, _mm512_set1_epi32(c)), val);
  }
  using T4 = __m512;
  static T4 table4(const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); }
  static F permute4(T4 t, I idx) { return _mm512_permutevar_ps(t, idx); }  // uses idx & 3
  // 16-entry table of floats; lane takes table[idx & 15] in one permute (cheaper than mask + convert).
  static constexpr bool LUT16 = true;
  using T16 = __m512;
  static T16 table16(const float* p) { return _mm512_loadu_ps(p); }
  static F lookup16(T16 t, I idx) { return _mm512_permutexvar_ps(idx, t); }
  static F load_u8_float(const uint8_t* p) { return _mm512_cvtepi32_ps(load_u8(p)); }
  static F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F load_bf16(const uint16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
};
