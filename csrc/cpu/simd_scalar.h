// Plain C++ "vector" of one lane: the reference instruction-set path, and the template's
// fallback on machines without AVX2. Included only by int4_scalar.cpp.
#pragma once
#include <cstdint>
#include <cstring>

struct VecScalar {
  static constexpr int W = 1;       // lanes
  static constexpr int MR = 4;      // micro-kernel rows
  static constexpr int NRV = 8;     // micro-kernel vectors per row (NR = NRV * W columns)
  static constexpr int GEMV_MR = 1; // rows per pass in the small-M kernel
  static constexpr int MR24 = 4;    // 2:4 micro-kernel rows
  // 2:4 forward at larger M: the permute micro-kernel
  static constexpr bool S24_MICRO = true;
  using F = float;
  using I = int32_t;
  // Bit deposit (BMI2 PDEP): the low bits of src, in order, at the set bits of mask.
  static uint64_t pdep(uint64_t src, uint64_t mask) {
    uint64_t out = 0;
    for (; mask; mask &= mask - 1, src >>= 1)
      if (src & 1) out |= mask & (~mask + 1);
    return out;
  }
  static F zero() { return 0.f; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static I load_i(const float* p) { I v; std::memcpy(&v, p, 4); return v; }  // int bits kept in a float slot
  static void store_i(float* p, I v) { std::memcpy(p, &v, 4); }
  static F bcast(float v) { return v; }
  static F fma(F a, F b, F c) { return a * b + c; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static I load_u8(const uint8_t* p) { return *p; }
  static I load_s8(const uint8_t* p) { return int8_t(*p); }
  // Byte o of little-endian words q.
  static I words_u8(const uint64_t* q, int o) { return uint8_t(q[o / 8] >> (8 * (o % 8))); }
  static I words_s8(const uint64_t* q, int o) { return int8_t(q[o / 8] >> (8 * (o % 8))); }
  static I sll(I v, int n) { return I(uint32_t(v) << n); }
  static I sra(I v, int n) { return v >> n; }  // arithmetic (GCC, C++20)
  static F low_nibble(I v) { return float(v & 15); }
  static F byte_float(I v) { return float(v); }
  static F high_nibble(I v) { return float(v >> 4); }
  static I srl(I v, int n) { return v >> n; }
  static I and_(I v, int m) { return v & m; }
  static F select_eq(I idx, int c, F val) { return idx == c ? val : 0.f; }
  // Table of 4 floats; lane takes table[idx & 3] (the vector ISAs' in-lane permute).
  using T4 = const float*;
  static T4 table4(const float* p) { return p; }
  static F permute4(T4 t, I idx) { return t[idx & 3]; }
  static constexpr bool LUT16 = false;  // no 16-entry table (V::lookup16)
  static F load_u8_float(const uint8_t* p) { return float(*p); }
  static F load_f16(const uint16_t* p) { return half_to_float(*p); }
  static F load_bf16(const uint16_t* p) {
    uint32_t u = uint32_t(*p) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static float half_to_float(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
      if (man == 0) {
        u = sign;
      } else {  // subnormal: normalise
        int e = -1;
        do { ++e; man <<= 1; } while (!(man & 0x400));
        u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
      }
    } else if (exp == 31) {
      u = sign | 0x7f800000u | man << 13;
    } else {
      u = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
