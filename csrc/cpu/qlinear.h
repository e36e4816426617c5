// Linear layers on packed low-bit weights, on the CPU. Plain C++: raw pointers and sizes, no torch.
//
// Every layout takes the N output rows in blocks of 32 and stores, per block, one lane per row, so
// that a SIMD register holds the same column of consecutive rows. The meaning of the bytes is defined
// by the pure-torch reference in ctp_fast/formats/ (unpack); in short, for block b, column k:
//
//   dense, bits 4   codes[(b*K + k)*16 + i]: row 32b+i in the low nibble, row 32b+16+i in the high.
//   dense, bits 8   codes[(b*K + k)*32 + i]: row 32b+i.
//   dense, bits 3   codes[(b*K + k)*12 ...]: a 96-bit little-endian stream, row 32b+i at bits 3i..3i+2.
//   sparse24        per quad j = k/4, 48 bytes at codes[(b*K/4 + j)*48]: the two kept codes of each
//                   row (slot 0, slot 1) as two 16-byte nibble columns like dense 4-bit, then 16 bytes
//                   of 2-bit positions: byte i = pos(i, slot0) | pos(i, slot1) << 2 |
//                   pos(16+i, slot0) << 4 | pos(16+i, slot1) << 6. Unused slots hold code = zero point.
//   unstructured    (version 2) rows in nibble order: p = 2j is row 32b+j, p = 2j+1 row 32b+16+j (the
//                   nibbles of the dense 4-bit column). masks[b*K + k] bit p: that row kept. codes: per
//                   block, column and half (nibbles 0..15, 16..31) the kept codes XOR their zero point,
//                   in nibble order, two per byte (low first), each half padded to a byte; then 8 spare
//                   bytes. offsets[b*ceil(K/32) + c] = byte where column 32c of block b starts.
//
// scales [blocks][G][32] (fp32, fp16 or bf16) and zeros [blocks][G][32] uint8 (null: symmetric, zero
// point 2^(bits-1)). A stored weight is (q - zero) * scale, 0 where pruned; group g = k / group_size.
// perm (optional, act-order): packed column k holds input column perm[k]; the kernels gather x through it.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ctp {

// avx512bf16: the avx512 kernels, plus bf16 dot products (vdpbf16ps) for bf16 activations at M > GEMV_MAX_M.
// amx: the avx512 kernels, with AMX tiles (qlinear_amx.cpp) for fp32 and bf16 activations at M >= AMX_MIN_M.
enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3, amx = 4 };
enum class ScaleType : int { f32 = 0, f16 = 1, bf16 = 2 };
enum class Layout : int { dense = 0, sparse24 = 1, unstructured = 2 };

// Set by a kernel that found an unstructured weight's masks and offsets disagreeing (first finder wins).
struct KernelError {
  int set = 0;
  int64_t block = 0, chunk = 0;  // offsets entry [block, chunk] (chunk == nchunks: the block's end)
  int64_t offset = 0, found = 0;  // where that entry says the codes start, where the masks say
};

struct QView {
  Layout layout;
  int bits;                // 3, 4 or 8 for dense; 4 for the sparse layouts
  const uint8_t* codes;
  const uint32_t* masks;   // unstructured only
  const int64_t* offsets;  // unstructured only
  const void* scales;
  const uint8_t* zeros;    // null: symmetric
  const int64_t* perm;     // null: identity
  int64_t N, K, group_size;
  ScaleType scale_type;
  // unstructured only: bytes in codes (reads are kept inside), and where to report masks and offsets
  // that disagree (ignored when null; the kernels then just stay inside the stream)
  int64_t codes_bytes = 0;
  KernelError* error = nullptr;
  int64_t nblocks() const { return (N + 31) / 32; }
  int64_t ngroups() const { return (K + group_size - 1) / group_size; }
  int64_t nchunks() const { return (K + 31) / 32; }
};

// Up to this many rows of activations the kernels stream W once per call (GEMV); above it they tile.
constexpr int64_t GEMV_MAX_M = 4;
// From this many rows on, Isa::amx runs the AMX tiles (16 rows each; fewer would mostly multiply padding).
constexpr int64_t AMX_MIN_M = 16;

// Run body(ctx, begin, end) over [0, n) split into ranges, possibly in parallel.
typedef void (*TaskFn)(void* ctx, int64_t begin, int64_t end);
typedef void (*ParallelFn)(int64_t n, void* ctx, TaskFn body);
void run_serial(int64_t n, void* ctx, TaskFn body);

// Checks the sizes a layout needs (bits, K % 4 for 2:4, group size a multiple of 4 ...). Returns null
// when w is usable, else a message naming the constraint.
const char* check_view(const QView& w);

// Unstructured weights, a full check that masks, offsets and codes (w.codes_bytes) agree, O(N K / 32).
// The bindings check only what is cheap (offsets inside the stream, ascending) and let the kernels, which
// count the codes anyway, report a disagreement through w.error. Null when fine, else a message.
const char* check_unstructured(const QView& w);

// y[M, N] = x[M, K] W^T (+ bias[N]); x, y fp32 row-major and contiguous.
void linear(Isa isa, const QView& w, const float* x, int64_t M, const float* bias, float* y,
            ParallelFn par = run_serial);
// gx[M, K] = gy[M, N] W; gy, gx fp32 row-major and contiguous.
void linear_grad_input(Isa isa, const QView& w, const float* gy, int64_t M, float* gx,
                       ParallelFn par = run_serial);

// bf16 activations x [M, K] (gy [M, N]), raw bf16 bits, row-major and contiguous; y, gx fp32. Only where
// bf16_gemm(isa, M): W's dequantized values are rounded to bf16 (to nearest even) and meet the activations
// in bf16 dot products with fp32 accumulation, as in a bf16 matmul. Elsewhere callers widen the
// activations to fp32 and call linear / linear_grad_input, which use W exactly.
bool bf16_gemm(Isa isa, int64_t M);
void linear_bf16(const QView& w, const uint16_t* x, int64_t M, const float* bias, float* y,
                 ParallelFn par = run_serial);
void linear_grad_input_bf16(const QView& w, const uint16_t* gy, int64_t M, float* gx,
                            ParallelFn par = run_serial);

// Instruction sets: what this CPU supports, and their names.
bool isa_supported(Isa isa);
Isa best_isa();
const char* isa_name(Isa isa);
bool isa_from_name(const char* name, Isa* out);

// Per-ISA entry points (namespaced so the three compilations never share a symbol).
#define CTP_DECLARE_ISA(NS)                                                                        \
  namespace NS {                                                                                   \
  void linear(const QView& w, const float* x, int64_t M, const float* bias, float* y, ParallelFn par); \
  void linear_grad_input(const QView& w, const float* gy, int64_t M, float* gx, ParallelFn par);   \
  const char* check_unstructured(const QView& w);                                                  \
  }
CTP_DECLARE_ISA(scalar)
CTP_DECLARE_ISA(avx2)
CTP_DECLARE_ISA(avx512)
#undef CTP_DECLARE_ISA
namespace avx512bf16 {
void linear_bf16(const QView& w, const uint16_t* x, int64_t M, const float* bias, float* y, ParallelFn par);
void linear_grad_input_bf16(const QView& w, const uint16_t* gy, int64_t M, float* gx, ParallelFn par);
}
namespace amx {
bool usable(const QView& w, int64_t M);  // M >= AMX_MIN_M and groups of a multiple of 32 columns (or one group)
void linear(const QView& w, const float* x, int64_t M, const float* bias, float* y, ParallelFn par);
void linear_grad_input(const QView& w, const float* gy, int64_t M, float* gx, ParallelFn par);
}

}  // namespace ctp
