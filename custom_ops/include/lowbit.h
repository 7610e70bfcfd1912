// Ops of the com.optimum.adaround domain (version 1) and the packed weight layout they share.
//
// MatMulLowBit    Y[..., N] = X[..., K] @ dequant(B)^T (+ bias)
//   inputs : X (T = float | float16), B (uint8, packed codes, see below),
//            scales (float | float16, [N, n_blocks]), zero_points (uint8 [N, n_blocks], optional: absent or
//            empty = symmetric, implied zero point 2^(bits-1)), bias (T [N], optional)
//   attrs  : K, N, bits (2..8), block_size (power of two >= 16, or == K for one block per channel),
//            accuracy_level (0..4; 4 lets the M < 4 path quantize X to int8 per block and use integer dot
//            products, like com.microsoft::MatMulNBits accuracy_level 4; 0..3 accumulate exactly in fp32)
//   dequant: W[n, k] = (code[n, k] - zp[n, k / block_size]) * scales[n, k / block_size]
//
// MatMulCodebook  same shapes and attributes (no zero_points, accuracy_level is always fp32):
//   inputs : X, B, scales, codebook (float32 [2^bits]: NF4, FP4 e2m1 or learned), bias (optional)
//   dequant: W[n, k] = codebook[code[n, k]] * scales[n, k / block_size]
//
// Packed layout of B ("lowbit v1"), uint8 of shape [N, n_chunks, 4 * bits], n_chunks = ceil(K / 32):
//   * Row n holds the K codes of output channel n along K, zero-padded to n_chunks * 32 values, cut
//     into chunks of 32 consecutive values. Chunk c of row n starts at byte (n * n_chunks + c) * 4 * bits.
//     Blocks (scales) are independent of chunks: block sizes >= 16 only ever split a chunk in two halves.
//   * A chunk stores its codes as bit planes of width 4, 2, 1 (the binary digits of `bits`, widest
//     first; bits = 8 is one 8-bit plane): 3 = 2+1, 4 = 4, 5 = 4+1, 6 = 4+2, 7 = 4+2+1, 2 = 2.
//     The plane of width w takes 4*w bytes; planes follow each other in that order, and a plane holds the
//     next w bits of each code, starting at bit 0 (3 bits: plane 0 = bits 0-1, plane 1 = bit 2).
//   * In the plane of width w, the w bits of value j (0..31) sit in byte (j mod 4w) at bit offset
//     w * (j div 4w). Example, bits = 3, chunk of 12 bytes:
//       bytes 0..7  : byte p (0..7) = v[p] | v[p+8] << 2 | v[p+16] << 4 | v[p+24] << 6   (low 2 bits)
//       bytes 8..11 : byte 8+p (0..3) = sum over i=0..7 of bit2(v[p + 4i]) << i          (bit 2)
//   Why: one plane decodes to 32 bytes with one broadcast, one variable shift and one AND in AVX2
//   (the shift count only depends on the SIMD lane), and a CUDA thread reads a chunk as `bits` aligned
//   32-bit words.
#pragma once

#include <cstddef>
#include <cstdint>

#include "layout.h"

namespace oa {

struct GemmShape {
  int64_t M = 0, K = 0, N = 0;
  int bits = 4;
  int64_t block_size = 32;
  int64_t n_blocks() const { return (K + block_size - 1) / block_size; }
  int64_t n_chunks() const { return (K + kChunk - 1) / kChunk; }
  int64_t chunk_bytes() const { return 4 * bits; }
  int64_t row_bytes() const { return n_chunks() * chunk_bytes(); }
};

// Scalar decode of value j of a chunk (the definition; SIMD/CUDA paths are tested against it).
inline uint8_t decode_one(const uint8_t* chunk, int bits, int j) {
  uint8_t v = 0;
  int shift = 0;
  for (int i = 0; plane_width(bits, i) != 0; ++i) {
    const int w = plane_width(bits, i);
    const int nbytes = 4 * w;
    const uint8_t byte = chunk[j % nbytes];
    const int off = w * (j / nbytes);
    v = static_cast<uint8_t>(v | (((byte >> off) & ((1 << w) - 1)) << shift));
    shift += w;
    chunk += nbytes;
  }
  return v;
}

// CPU problem description. All pointers are host pointers; X is fp32 (converted by the op when needed),
// scales and zero points are read in place (converted one row at a time inside the kernels).
struct CpuProblem {
  GemmShape shape;
  const float* x = nullptr;        // [M, K_pad], rows zero-padded to n_chunks * 32
  const uint8_t* b = nullptr;      // packed codes
  const void* scales = nullptr;    // [N, n_blocks] float32, or float16 bits when scales_half
  bool scales_half = false;
  const uint8_t* zp = nullptr;     // [N, n_blocks] zero points; nullptr = implied 2^(bits-1) (int codes)
  const float* codebook = nullptr; // [2^bits] or nullptr (int codes)
  const float* bias = nullptr;     // [N] or nullptr
  float* y = nullptr;              // [M, N]
  int accuracy_level = 0;
};

// Row n's scales (and zero points, as floats; nullptr for codebooks) in fp32: a pointer into the input
// when it already is fp32, else converted into `buf`.
const float* row_scales(const CpuProblem& p, int64_t n, float* buf);
const float* row_zero_points(const CpuProblem& p, int64_t n, float* buf);

// Parallel-for callback supplied by the op (ORT's thread pool): runs fn(ctx, i) for i in [0, total).
using ParallelFor = void (*)(void* runner, void (*fn)(void*, size_t), size_t total, void* fn_ctx);

// Runs the problem on the CPU with the best kernels this CPU has (see cpu_isa()).
void cpu_gemm(const CpuProblem& p, ParallelFor pfor, void* runner);

// Kernel families; OPTIMUM_ADAROUND_ISA=scalar|avx2|avx512vnni caps the choice (tests use it).
enum class Isa { Scalar = 0, Avx2 = 1, Avx512Vnni = 2 };
Isa cpu_isa();

// Portable kernels (kernels_scalar.cc): rows [n0, n1) of Y for all M.
void scalar_rows(const CpuProblem& p, int64_t n0, int64_t n1);

// fp16 <-> fp32 conversion (F16C when available).
void half_to_float(const uint16_t* src, float* dst, size_t n);
void float_to_half(const float* src, uint16_t* dst, size_t n);

// x86 SIMD kernels (kernels_x86.inc, built once per ISA): per-call preparation (int8 activations etc.),
// rows [n0, n1) of Y, release of the preparation.
#define OA_DECLARE_ISA(ns)                                                         \
  namespace ns {                                                                   \
  void* prepare(const CpuProblem& p);                                              \
  void rows(const CpuProblem& p, int64_t n0, int64_t n1, const void* prep);        \
  void release(void* prep);                                                        \
  void half_to_float(const uint16_t* src, float* dst, size_t n);                   \
  void float_to_half(const float* src, uint16_t* dst, size_t n);                   \
  }
OA_DECLARE_ISA(avx2)
OA_DECLARE_ISA(avx512vnni)
#undef OA_DECLARE_ISA

}  // namespace oa
