// Group-wise int4 linear kernels on the CPU. Plain C++: raw pointers and sizes, no torch.
//
// Packed layout (the meaning is defined by ctp_fast/formats/int4.py:Int4Weight.unpack):
//   Output rows are taken in blocks of 32. For block b and (possibly permuted) column k,
//   16 bytes at qweight[(b * K + k) * 16 + j] hold code q[32b + j][k] in the low nibble and
//   q[32b + 16 + j][k] in the high nibble. A block streams contiguously along K, so the
//   small-M kernel reads the weight once, sequentially, with one lane per output row.
//   scales [nblocks][G][32] (fp32, fp16 or bf16), zeros [nblocks][G][32] uint8 or null
//   (symmetric: zero point 8). Weight value: (q - zero) * scale, group g = k / group_size.
//   perm (optional, act-order): packed column k holds original input column perm[k];
//   the kernels gather x through it instead of unpermuting the weight.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ctp {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };
enum class ScaleType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct Int4View {
  const uint8_t* qweight;
  const void* scales;
  const uint8_t* zeros;   // null: symmetric
  const int64_t* perm;    // null: identity
  int64_t N, K, group_size;
  ScaleType scale_type;
  int64_t nblocks() const { return (N + 31) / 32; }
  int64_t ngroups() const { return (K + group_size - 1) / group_size; }
};

// Run body(ctx, begin, end) over [0, n) split into ranges, possibly in parallel.
typedef void (*TaskFn)(void* ctx, int64_t begin, int64_t end);
typedef void (*ParallelFn)(int64_t n, void* ctx, TaskFn body);
void run_serial(int64_t n, void* ctx, TaskFn body);

// y[M, N] = x[M, K] W^T (+ bias[N]); x, y fp32 row-major and contiguous.
void int4_linear(Isa isa, const Int4View& w, const float* x, int64_t M, const float* bias, float* y,
                 ParallelFn par = run_serial);
// gx[M, K] = gy[M, N] W; gy, gx fp32 row-major and contiguous.
void int4_linear_grad_input(Isa isa, const Int4View& w, const float* gy, int64_t M, float* gx,
                            ParallelFn par = run_serial);

// Instruction sets: what this CPU supports, and the one in use (CTP_FAST_ISA or the best).
bool isa_supported(Isa isa);
Isa best_isa();
const char* isa_name(Isa isa);
bool isa_from_name(const char* name, Isa* out);

// Per-ISA entry points (namespaced so the three compilations never share a symbol).
#define CTP_DECLARE_ISA(NS)                                                                        \
  namespace NS {                                                                                   \
  void linear(const Int4View& w, const float* x, int64_t M, const float* bias, float* y,           \
              ParallelFn par);                                                                     \
  void linear_grad_input(const Int4View& w, const float* gy, int64_t M, float* gx, ParallelFn par); \
  }
CTP_DECLARE_ISA(scalar)
CTP_DECLARE_ISA(avx2)
CTP_DECLARE_ISA(avx512)
#undef CTP_DECLARE_ISA

}  // namespace ctp
