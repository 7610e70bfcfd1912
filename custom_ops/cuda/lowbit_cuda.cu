// CUDA kernels of MatMulLowBit / MatMulCodebook (layout: include/lowbit.h).
//
// Tensor-core GEMV (M <= 8, fp16 X, integer codes, blocks of 128+ values, sm_80+): mma.sync m16n8k16 over
//   16-row weight tiles, weights and x streamed through a per-warp cp.async ring (gemv_mma_kernel).
// FFMA GEMV (other M <= 4 cases: fp32 X, codebooks, small blocks): each warp 2 rows, a lane per 32-value
//   chunk with 16-byte weight loads, X staged in padded shared memory (gemv_kernel).
// GEMM (larger M): 32x32 output tile per 256-thread block; per 32-wide K step the block stages X and the
//   dequantized W tile in shared memory (rows padded to 33 floats against bank conflicts).
// Accumulation is fp32 everywhere; fp16 X/Y/bias/scales are converted on load/store.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "layout.h"
#include "lowbit_cuda.h"

namespace {

using oa::kChunk;
using oa::plane_width;

// Value j of a chunk held as 32-bit words (runtime bits/j: used by the GEMM tile loader).
__device__ __forceinline__ uint32_t decode_rt(const uint32_t* words, int bits, int j) {
  uint32_t v = 0;
  int shift = 0, wo = 0;
  for (int i = 0; i < 3; ++i) {
    const int w = plane_width(bits, i);
    if (w == 0) break;
    const int byte = j % (4 * w);
    const uint32_t word = words[wo + byte / 4];
    v |= ((word >> (8 * (byte % 4) + w * (j / (4 * w)))) & ((1u << w) - 1u)) << shift;
    shift += w;
    wo += w;
  }
  return v;
}

// Same, with BITS and J known at compile time: folds to one shift and mask per plane.
template <int BITS, int J>
__device__ __forceinline__ uint32_t decode_ct(const uint32_t* words) {
  constexpr int w0 = plane_width(BITS, 0), w1 = plane_width(BITS, 1), w2 = plane_width(BITS, 2);
  uint32_t v = (words[(J % (4 * w0)) / 4] >> (8 * (J % 4) + w0 * (J / (4 * w0)))) & ((1u << w0) - 1u);
  if constexpr (w1 != 0)
    v |= ((words[w0 + (J % (4 * w1)) / 4] >> (8 * (J % 4) + w1 * (J / (4 * w1)))) & ((1u << w1) - 1u)) << w0;
  if constexpr (w2 != 0)
    v |= ((words[w0 + w1 + (J % (4 * w2)) / 4] >> (8 * (J % 4) + w2 * (J / (4 * w2)))) & ((1u << w2) - 1u))
         << (w0 + w1);
  return v;
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }

__device__ __forceinline__ float load_scale(const void* s, int64_t i, bool half) {
  return half ? __half2float(static_cast<const __half*>(s)[i]) : static_cast<const float*>(s)[i];
}

struct Dev {
  const uint8_t* b;
  const void* scales;
  const uint8_t* zp;
  const float* codebook;
  int64_t M, K, N, bs, nb, nch;
  int bits;
  int bs_log2;  // log2(block size), -1 for one block per row (block size >= K)
  bool scales_half;
};

// The w-bit field at `shift` of each byte of `word`, times 0x01010101 masks: one shift and one AND.
template <int W>
__device__ __forceinline__ uint32_t plane_bytes(uint32_t word, int shift) {
  return (word >> shift) & (((1u << W) - 1u) * 0x01010101u);
}

// The BITS words of one chunk, in as few loads as its alignment allows (a chunk starts at a multiple of
// 4*BITS bytes): 16-byte loads for 4 and 8 bits, 8-byte loads for 2 and 6, 4-byte loads otherwise.
template <int BITS>
__device__ __forceinline__ void load_chunk(const uint32_t* p, uint32_t (&w)[BITS]) {
  if constexpr (BITS % 4 == 0) {
#pragma unroll
    for (int i = 0; i < BITS; i += 4) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p + i));
      w[i] = v.x, w[i + 1] = v.y, w[i + 2] = v.z, w[i + 3] = v.w;
    }
  } else if constexpr (BITS % 2 == 0) {
#pragma unroll
    for (int i = 0; i < BITS; i += 2) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p + i));
      w[i] = v.x, w[i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = __ldg(p + i);
  }
}

// Codes of values 4g..4g+3 of a chunk, one per byte. In the plane of width w they are one whole word
// (word g mod w, bit offset w*(g div w) + 8t for value t): G is a compile-time group index, so every
// shift is a constant.
template <int BITS, int G>
__device__ __forceinline__ uint32_t group_codes(const uint32_t (&q)[BITS]) {
  constexpr int W0 = plane_width(BITS, 0), W1 = plane_width(BITS, 1), W2 = plane_width(BITS, 2);
  uint32_t v = plane_bytes<W0>(q[G % W0], W0 * (G / W0));
  if constexpr (W1 != 0) v |= plane_bytes<W1>(q[W0 + G % W1], W1 * (G / W1)) << W0;
  if constexpr (W2 != 0) v |= plane_bytes<W2>(q[W0 + W1 + G % W2], W2 * (G / W2)) << (W0 + W1);
  return v;
}

constexpr int kXPad = 36;  // floats per chunk of X in shared memory: 32 + 4, so 16-byte reads of 8
                           // consecutive lanes (chunks c..c+7, same offset) hit 8 distinct bank quads

// GEMV, M <= 4 (MT = 1, or 4 with rows past M zero). Each warp computes RW output rows over the whole of
// K, lane l taking chunks l, l+32, ... (U of them loaded before any is used, to keep U*RW wide loads in
// flight): a warp's load of one row is one contiguous 32-chunk stretch (512 bytes at 4 bits). X is staged
// per tile of TKC chunks in shared memory, padded so that a lane's 16-byte reads of its own chunk do not
// collide, and read once per group for all RW rows. The code -> float conversion is exact and avoids the
// slow int->float unit: byte t of the gathered codes is permuted into the mantissa of 2^23
// (0x4B0000vv = 2^23 + v) and 2^23 + zero point is subtracted. A chunk's two 16-value halves each sit in
// one block (block sizes are powers of two >= 16), so a half is one dot product and one scale FMA.
template <int BITS, bool CB, int MT, typename T, int RW, int WARPS, int U>
__global__ void __launch_bounds__(32 * WARPS) gemv_kernel(Dev d, const T* __restrict__ x, const T* __restrict__ bias,
                                                          T* __restrict__ y) {
  constexpr int TKC = 256 / MT;  // chunks of X per tile: 36 KiB of shared memory
  __shared__ __align__(16) float xs[MT][TKC * kXPad];
  __shared__ float table[CB ? 1 << BITS : 1];
  if constexpr (CB)
    for (int i = threadIdx.x; i < (1 << BITS); i += blockDim.x) table[i] = d.codebook[i];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * WARPS + warp) * RW;
  const bool vec = d.K % 4 == 0;
  constexpr float kMagic = 8388608.f;  // 2^23: the float 0x4B0000vv is 2^23 + v
  const float implied = static_cast<float>(1 << (BITS - 1));
  float acc[RW][MT] = {};
  for (int64_t t0 = 0; t0 < d.nch; t0 += TKC) {
    const int tc = static_cast<int>(min(static_cast<int64_t>(TKC), d.nch - t0));
    __syncthreads();  // the previous tile is consumed (and the codebook table written)
    for (int i = threadIdx.x; i < MT * tc * 8; i += blockDim.x) {
      const int m = i / (tc * 8), c = i / 8 % tc, q4 = i % 8;
      const int64_t k = (t0 + c) * kChunk + 4 * q4;
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (m < d.M) {
        const T* src = x + m * d.K + k;
        if (vec && k + 3 < d.K) {
          if constexpr (sizeof(T) == 4) {
            v = __ldg(reinterpret_cast<const float4*>(src));
          } else {
            const uint2 raw = __ldg(reinterpret_cast<const uint2*>(src));
            const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
            const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
            v = make_float4(lo.x, lo.y, hi.x, hi.y);
          }
        } else {
          v.x = k < d.K ? to_f(src[0]) : 0.f;
          v.y = k + 1 < d.K ? to_f(src[1]) : 0.f;
          v.z = k + 2 < d.K ? to_f(src[2]) : 0.f;
          v.w = k + 3 < d.K ? to_f(src[3]) : 0.f;
        }
      }
      *reinterpret_cast<float4*>(&xs[m][c * kXPad + 4 * q4]) = v;
    }
    __syncthreads();
    for (int c0 = lane; c0 < tc; c0 += 32 * U) {
      uint32_t q[U][RW][BITS];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < RW; ++r) {
          if (c0 + 32 * u < tc && n0 + r < d.N)
            load_chunk<BITS>(reinterpret_cast<const uint32_t*>(d.b) + ((n0 + r) * d.nch + t0 + c0 + 32 * u) * BITS,
                             q[u][r]);
          else
#pragma unroll
            for (int i = 0; i < BITS; ++i) q[u][r][i] = 0u;
        }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u;
        if (c >= tc) break;
        const int64_t k0 = (t0 + c) * kChunk;
        // the second half's block, clamped: past K (last chunk) its values are zero but the read must stay in bounds
        const int64_t b0 = d.bs_log2 < 0 ? 0 : k0 >> d.bs_log2;
        const int64_t b1 = d.bs_log2 < 0 ? 0 : min((k0 + 16) >> d.bs_log2, d.nb - 1);
        const float* xc = &xs[0][c * kXPad];
        float dot[RW][2][MT] = {};
        float zc[RW][2] = {};
        if constexpr (!CB)
#pragma unroll
          for (int r = 0; r < RW; ++r) {
            const int64_t n = min(n0 + r, d.N - 1);  // rows past N compute garbage that is never stored
            zc[r][0] = kMagic + (d.zp ? static_cast<float>(d.zp[n * d.nb + b0]) : implied);
            zc[r][1] = kMagic + (d.zp ? static_cast<float>(d.zp[n * d.nb + b1]) : implied);
          }
        const auto group = [&](auto gc) {  // values 4G..4G+3 of the chunk, all RW rows
          constexpr int G = decltype(gc)::value;
          float4 xv[MT];
#pragma unroll
          for (int m = 0; m < MT; ++m) xv[m] = *reinterpret_cast<const float4*>(xc + m * TKC * kXPad + 4 * G);
#pragma unroll
          for (int r = 0; r < RW; ++r) {
            const uint32_t codes = group_codes<BITS, G>(q[u][r]);
            float w[4];
#pragma unroll
            for (int t = 0; t < 4; ++t)
              w[t] = CB ? table[(codes >> (8 * t)) & 0xFFu]
                        : __int_as_float(__byte_perm(codes, 0x4B000000u, 0x7440u + t)) - zc[r][G / 4];
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              float& a = dot[r][G / 4][m];
              a = fmaf(w[0], xv[m].x, a), a = fmaf(w[1], xv[m].y, a), a = fmaf(w[2], xv[m].z, a),
              a = fmaf(w[3], xv[m].w, a);
            }
          }
        };
        group(std::integral_constant<int, 0>{}), group(std::integral_constant<int, 1>{});
        group(std::integral_constant<int, 2>{}), group(std::integral_constant<int, 3>{});
        group(std::integral_constant<int, 4>{}), group(std::integral_constant<int, 5>{});
        group(std::integral_constant<int, 6>{}), group(std::integral_constant<int, 7>{});
#pragma unroll
        for (int r = 0; r < RW; ++r) {
          const int64_t n = n0 + r;
          if (n >= d.N) break;
          const float s0 = load_scale(d.scales, n * d.nb + b0, d.scales_half);
          const float s1 = load_scale(d.scales, n * d.nb + b1, d.scales_half);
#pragma unroll
          for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(s0, dot[r][0][m], fmaf(s1, dot[r][1][m], acc[r][m]));
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < RW; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      const int64_t n = n0 + r;
      if (lane == 0 && n < d.N && m < d.M) store(y + m * d.N + n, v + (bias ? to_f(bias[n]) : 0.f));
    }
}

// GEMV on the tensor cores: fp16 X, integer codes, one scale (and zero point) per 128 or more values,
// M <= 8. One mma.sync m16n8k16 (fp16 operands, fp32 accumulation) takes A = 16 values of 16 weight rows
// and B = the same 16 positions of up to 8 rows of X (columns M..7 zero). The fragment layout decides who
// holds what: lane t (group g = t/4, i = t%4) gives A rows g and g+8 at k slots 2i, 2i+1, 2i+8, 2i+9, and
// B column g (row g of X) at the same slots. A dot product does not care which k a slot stands for as long
// as A and B agree, so lane t takes its whole chunk 4j+i of rows g and g+8 (32 values each) and feeds
// values 4G..4G+3 of them in the G-th of the chunk's 8 MMAs; B's lanes read x at those same 4 positions.
// The 4 lanes of a group hold chunks 4j..4j+3, one 128-value quad, which lies in one block: the quad's
// MMAs accumulate raw dot products and the scale is applied once per quad in fp32.
// Codes become halves exactly without I2F: PRMT puts code v under the high byte 0x64 (the half 0x64vv is
// 1024 + v). With FOLD (the default) the MMAs take 1024 + v as is and one more MMA per step, of x with
// ones, gives sum x, so that sum (v - z) x = sum (1024 + v) x - (1024 + z) sum x per quad; products of
// fp16 x and integers below 2048 are exact, and the fp32 accumulator holding ~1024 sum x costs about 2^8
// of its 2^-24 (still far below fp16 output rounding; worst checked error 4.9e-4 with fp16 outputs, as
// without FOLD). Without FOLD an HSUB2 of 1024 + z per pair leaves v - z exactly. The weights and x of the
// next STAGES - 1 quads are in flight in a per-warp cp.async ring in shared memory, not in registers.
// Measured on an H200 (benchmarks/cuda_gemv.py --variant, 2026-12-04): 8192x28672 4-bit 2.58 TB/s (54%
// of nominal, 1.37x the FFMA kernel), 4096x4096 1.21 TB/s; SASS ~2.7 instructions per 4-bit weight
// (FFMA kernel ~5.9). ncu at 8192x28672: issue slots 47% busy, DRAM 53%, 1.07 of 3.5 warps eligible per
// scheduler (occupancy 25%, capped by 122 registers and the rings): latency-bound. Tried and slower:
// 4 or 6 stages, 1 tile per warp, two accumulator chains per tile, a 3-block register cap (spills), fixed
// K splits (see docs/DESIGN.md).
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // never launched below sm_80 (see mma_eligible)
#endif
}

[[maybe_unused]] __device__ __forceinline__ uint32_t hsub2_u32(uint32_t a, uint32_t b) {
  const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// Asynchronous copies global -> shared (sm_80+): `bytes` of 4, 8 or 16; src_bytes 0 fills zeros.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes = BYTES) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  if constexpr (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src), "n"(BYTES), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Shared memory of one warp's pipeline stage: the weight words of its lanes (unit-interleaved so that
// lanes read consecutive addresses) and, for lanes 0..4M-1, 64 bytes of X each.
template <int BITS, int R>
struct MmaStage {
  static constexpr int kUnit = BITS % 4 == 0 ? 16 : BITS % 2 == 0 ? 8 : 4;  // bytes per copy (load_chunk's)
  static constexpr int kUnits = 4 * BITS / kUnit;                         // per row chunk
  static constexpr int kWeightBytes = 32 * 2 * R * 4 * BITS;
  __host__ __device__ static constexpr int bytes(int m) { return kWeightBytes + 64 * 4 * m; }
};

// R 16-row tiles per warp; STAGES quads in flight per warp (cp.async ring in shared memory, so that the
// loads in flight do not hold registers); KS warps (runtime) split K.
template <int BITS, int R, int STAGES, bool SH, bool FOLD>
__global__ void __launch_bounds__(256) gemv_mma_kernel(Dev d, int ks, const __half* __restrict__ x,
                                                        const __half* __restrict__ bias, __half* __restrict__ y) {
  using St = MmaStage<BITS, R>;
  extern __shared__ __align__(16) unsigned char mma_smem[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, i = lane % 4;
  const int s = warp % ks;
  const int M = static_cast<int>(d.M), stage_bytes = St::bytes(M);
  unsigned char* ring = mma_smem + static_cast<size_t>(warp) * STAGES * stage_bytes;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * (8 / ks) + warp / ks) * (16 * R);  // warp's first row
  const int nch = static_cast<int>(d.nch), nq = (nch + 3) / 4, K = static_cast<int>(d.K);
  // Rows past N read row N-1 and chunks past the end read the last chunk: garbage that meets x = 0 or is
  // never stored, so the copies need no guards.
  const unsigned char* wrow[R][2];
  const uint8_t* zrow[R][2];
  int64_t srow[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = min(n0 + 16 * r + 8 * h + g, d.N - 1);
      wrow[r][h] = d.b + n * d.nch * 4 * BITS;
      zrow[r][h] = d.zp ? d.zp + n * d.nb : nullptr;
      srow[r][h] = n * d.nb;
    }
  const bool has_x = g < M;  // lane g gives B column g: a real row of X
  const __half* xrow = x + (has_x ? g : 0) * d.K;
  const int n_it = s < nq ? (nq - 1 - s) / ks + 1 : 0;  // quads s, s+ks, ... of this warp
  const auto issue = [&](int it) {                      // copies of the it-th quad into its ring slot
    if (it < n_it) {
      unsigned char* st = ring + (it % STAGES) * stage_bytes;
      const int jq = s + ks * it, c = min(4 * jq + i, nch - 1);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int v = 0; v < St::kUnits; ++v)
            cp_async<St::kUnit>(st + (((r * 2 + h) * St::kUnits + v) * 32 + lane) * St::kUnit,
                                wrow[r][h] + c * 4 * BITS + v * St::kUnit);
      if (has_x) {
        const int k0 = jq * 128 + 32 * i;  // K % 8 == 0: 8 values are all in or all out
#pragma unroll
        for (int G = 0; G < 4; ++G)
          cp_async<16>(st + St::kWeightBytes + lane * 64 + 16 * G, xrow + min(k0 + 8 * G, K - 8),
                       k0 + 8 * G < K ? 16 : 0);
      }
    }
    cp_async_commit();  // an empty group past the end keeps the group count uniform
  };
  // zero points (FOLD: 1024 + z as a float; else as a half2 to subtract) and scales of one quad
  const auto side = [&](int it, uint32_t (&zh)[R][2], float (&sc)[R][2]) {
    const int jq = s + ks * min(it, max(n_it - 1, 0));
    const int blk = d.bs_log2 < 0 ? 0 : (jq * 128) >> d.bs_log2;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t z = zrow[r][h] ? zrow[r][h][blk] : 1u << (BITS - 1);
        zh[r][h] = FOLD ? __float_as_uint(1024.f + static_cast<float>(z)) : 0x64006400u | (z * 0x00010001u);
        if constexpr (SH)
          sc[r][h] = __half2float(static_cast<const __half*>(d.scales)[srow[r][h] + blk]);
        else
          sc[r][h] = static_cast<const float*>(d.scales)[srow[r][h] + blk];
      }
  };
#pragma unroll
  for (int it = 0; it < STAGES - 1; ++it) issue(it);
  float acc[R][4] = {};
  uint32_t zh[R][2], zh_next[R][2];
  float sc[R][2], sc_next[R][2];
  side(0, zh_next, sc_next);
  for (int it = 0; it < n_it; ++it) {
    issue(it + STAGES - 1);
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) zh[r][h] = zh_next[r][h], sc[r][h] = sc_next[r][h];
    side(it + 1, zh_next, sc_next);  // one quad ahead: their latency hides behind this quad's MMAs
    cp_async_wait<STAGES - 1>();     // this quad's group has landed (each lane reads only its own copies)
    const unsigned char* st = ring + (it % STAGES) * stage_bytes;
    uint32_t q[R][2][BITS];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int v = 0; v < St::kUnits; ++v) {
          const unsigned char* src = st + (((r * 2 + h) * St::kUnits + v) * 32 + lane) * St::kUnit;
          if constexpr (St::kUnit == 16) {
            const uint4 t = *reinterpret_cast<const uint4*>(src);
            q[r][h][4 * v] = t.x, q[r][h][4 * v + 1] = t.y, q[r][h][4 * v + 2] = t.z, q[r][h][4 * v + 3] = t.w;
          } else if constexpr (St::kUnit == 8) {
            const uint2 t = *reinterpret_cast<const uint2*>(src);
            q[r][h][2 * v] = t.x, q[r][h][2 * v + 1] = t.y;
          } else {
            q[r][h][v] = *reinterpret_cast<const uint32_t*>(src);
          }
        }
    uint4 xa[4];
#pragma unroll
    for (int G = 0; G < 4; ++G)
      xa[G] = has_x ? *reinterpret_cast<const uint4*>(st + St::kWeightBytes + lane * 64 + 16 * G)
                    : make_uint4(0u, 0u, 0u, 0u);
    float c[R][4] = {};
    float csum[4] = {};  // FOLD: sum of x over the quad, per column (row of X)
    const auto step = [&](auto gc) {
      constexpr int G = decltype(gc)::value;
      const uint4& xv = xa[G / 2];
      const uint32_t b0 = G % 2 ? xv.z : xv.x, b1 = G % 2 ? xv.w : xv.y;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        uint32_t a[4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t codes = group_codes<BITS, G>(q[r][h]);
          a[h] = __byte_perm(codes, 0x64646464u, 0x4140u);      // values 4G, 4G+1 as 1024 + v
          a[h + 2] = __byte_perm(codes, 0x64646464u, 0x4342u);  // values 4G+2, 4G+3
          if constexpr (!FOLD) a[h] = hsub2_u32(a[h], zh[r][h]), a[h + 2] = hsub2_u32(a[h + 2], zh[r][h]);
        }
        mma_16816(c[r], a, b0, b1);
      }
      if constexpr (FOLD) {
        constexpr uint32_t kOnes[4] = {0x3C003C00u, 0x3C003C00u, 0x3C003C00u, 0x3C003C00u};  // half 1.0
        mma_16816(csum, kOnes, b0, b1);
      }
    };
    step(std::integral_constant<int, 0>{}), step(std::integral_constant<int, 1>{});
    step(std::integral_constant<int, 2>{}), step(std::integral_constant<int, 3>{});
    step(std::integral_constant<int, 4>{}), step(std::integral_constant<int, 5>{});
    step(std::integral_constant<int, 6>{}), step(std::integral_constant<int, 7>{});
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int e = 0; e < 4; ++e) {  // c: rows g, g+8; FOLD: sum (1024 + v) x - (1024 + z) sum x
        const float dot = FOLD ? fmaf(-__uint_as_float(zh[r][e / 2]), csum[e % 2], c[r][e]) : c[r][e];
        acc[r][e] = fmaf(sc[r][e / 2], dot, acc[r][e]);
      }
  }
  cp_async_wait<0>();  // nothing may still be writing this block's shared memory
  if (ks > 1) {        // sum the KS warps of each row group (uniform branch: ks is a kernel argument)
    float* red = reinterpret_cast<float*>(mma_smem);  // [8][R][4][32], over the rings once all are done
    __syncthreads();
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[((warp * R + r) * 4 + e) * 32 + lane] = acc[r][e];
    __syncthreads();
    if (s != 0) return;
    for (int j = 1; j < ks; ++j)
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[r][e] += red[(((warp + j) * R + r) * 4 + e) * 32 + lane];
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int e = 0; e < 4; ++e) {  // C element e: row g + 8 (e / 2) of the tile, column (row of X) 2i + e % 2
      const int64_t n = n0 + 16 * r + 8 * (e / 2) + g;
      const int m = 2 * i + e % 2;
      if (m < M && n < d.N) store(y + m * d.N + n, acc[r][e] + (bias ? to_f(bias[n]) : 0.f));
    }
}

template <typename T>
__global__ void gemm_kernel(Dev d, const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y) {
  __shared__ float xs[32][33];
  __shared__ float ws[32][33];
  const int tid = threadIdx.x, tx = tid % 32, ty = tid / 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * 32, n0 = static_cast<int64_t>(blockIdx.x) * 32;
  const int chunk_words = d.bits;
  const float implied = static_cast<float>(1 << (d.bits - 1));
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t c = 0; c < d.nch; ++c) {
    const int64_t k0 = c * kChunk;
    for (int i = tid; i < 32 * 32; i += blockDim.x) {
      const int r = i / 32, kk = i % 32;
      const int64_t m = m0 + r, k = k0 + kk;
      xs[r][kk] = (m < d.M && k < d.K) ? to_f(x[m * d.K + k]) : 0.f;
    }
    {  // thread t dequantizes values 4*(t%8) .. +3 of row t/8
      const int r = tid / 8, j0 = 4 * (tid % 8);
      const int64_t n = n0 + r;
      float v[4] = {0.f, 0.f, 0.f, 0.f};
      if (n < d.N) {
        uint32_t words[8];
        const uint32_t* src = reinterpret_cast<const uint32_t*>(d.b + (n * d.nch + c) * 4 * d.bits);
        for (int i = 0; i < chunk_words; ++i) words[i] = __ldg(src + i);
        for (int j = 0; j < 4; ++j) {
          const int64_t k = k0 + j0 + j;
          if (k >= d.K) continue;
          const int64_t blk = d.bs >= d.K ? 0 : k / d.bs;
          const uint32_t q = decode_rt(words, d.bits, j0 + j);
          const float s = load_scale(d.scales, n * d.nb + blk, d.scales_half);
          v[j] = d.codebook ? d.codebook[q] * s
                            : (static_cast<float>(q) - (d.zp ? static_cast<float>(d.zp[n * d.nb + blk]) : implied)) * s;
        }
      }
      for (int j = 0; j < 4; ++j) ws[r][j0 + j] = v[j];
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < 32; ++kk) {
      const float w = ws[tx][kk];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] += xs[ty + 8 * i][kk] * w;
    }
    __syncthreads();
  }
  const int64_t n = n0 + tx;
  if (n >= d.N) return;
  const float b = bias ? to_f(bias[n]) : 0.f;
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 8 * i;
    if (m < d.M) store(y + m * d.N + n, acc[i] + b);
  }
}

// GEMV shape: rows per warp, warps per block, chunks per lane loaded before use. Measured on an H100
// (benchmarks/cuda_gemv.py, 4-bit, 8192x28672 / 4096x4096, GB/s): 2/8/2 1884 / 1067, 4/8/1 1715 / 753,
// 1/8/4 1402 / 885, 2/4/2 1435 / 884, 4/4/2 1422 / 719. Prefetching the next iteration's loads into a
// second register set (more registers, fewer resident warps) measured slower: 1466 / 985.
// OA_GEMV_* let a build try others.
#ifndef OA_GEMV_ROWS
#define OA_GEMV_ROWS 2
#endif
#ifndef OA_GEMV_WARPS
#define OA_GEMV_WARPS 8
#endif
#ifndef OA_GEMV_STEPS
#define OA_GEMV_STEPS 2
#endif
template <int BITS, typename T>
void launch_gemv(const Dev& d, const T* x, const T* bias, T* y, cudaStream_t stream) {
  constexpr int R = OA_GEMV_ROWS, W = OA_GEMV_WARPS, U = OA_GEMV_STEPS;
  const dim3 grid(static_cast<unsigned>((d.N + R * W - 1) / (R * W))), block(32 * W);
  if (d.codebook)
    d.M == 1 ? gemv_kernel<BITS, true, 1, T, R, W, U><<<grid, block, 0, stream>>>(d, x, bias, y)
             : gemv_kernel<BITS, true, 4, T, R, W, U><<<grid, block, 0, stream>>>(d, x, bias, y);
  else
    d.M == 1 ? gemv_kernel<BITS, false, 1, T, R, W, U><<<grid, block, 0, stream>>>(d, x, bias, y)
             : gemv_kernel<BITS, false, 4, T, R, W, U><<<grid, block, 0, stream>>>(d, x, bias, y);
}

#ifndef OA_MMA_ROWS
#define OA_MMA_ROWS 2  // 16-row tiles per warp
#endif
#ifndef OA_MMA_STAGES
#define OA_MMA_STAGES 3  // quads in flight per warp
#endif
#ifndef OA_MMA_FOLD
#define OA_MMA_FOLD 1  // zero point folded out through an extra MMA of x with ones (no HSUB2 per value)
#endif
#ifndef OA_MMA_KSPLIT
#define OA_MMA_KSPLIT 0  // 1, 2, 4 or 8 fixes the warps that split K (benchmarking); 0 chooses
#endif
#ifndef OA_MMA_WARPS_PER_SM
#define OA_MMA_WARPS_PER_SM 32
#endif
#ifndef OA_MMA
#define OA_MMA 1  // 0: never use the tensor-core GEMV (for benchmarking against the FFMA kernel)
#endif

// Compute capability (major * 10 + minor) and multiprocessors of the current device, cached per device.
struct DeviceInfo {
  int cc = 0, sms = 0;
};
DeviceInfo device_info() {
  static DeviceInfo cached[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return {};
  DeviceInfo& c = cached[dev];
  if (c.sms == 0) {
    int major = 0, minor = 0, sms = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    c.cc = major * 10 + minor;
    c.sms = sms > 0 ? sms : 1;
  }
  return c;
}

// The tensor-core GEMV applies: fp16 X with 16-byte aligned rows (K % 8 == 0), integer codes, a block of
// 128 or more values (a quad never straddles two), M <= 8, and an sm_80+ device.
bool mma_eligible(const OaCudaArgs& a) {
  return OA_MMA && a.x_half && !a.codebook && a.M <= 8 && a.K % 8 == 0 &&
         reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && (a.block_size >= 128 || a.block_size >= a.K) &&
         device_info().cc >= 80;
}

template <int BITS>
void launch_gemv_mma(const Dev& d, const __half* x, const __half* bias, __half* y, cudaStream_t stream) {
  constexpr int R = OA_MMA_ROWS;
  // as many stages as asked for, fewer where 8 warps' rings at M = 8 would not fit in shared memory
  constexpr int S = std::min(OA_MMA_STAGES, 227 * 1024 / (8 * MmaStage<BITS, R>::bytes(8)));
  static_assert(S >= 2, "GEMV rings exceed shared memory");
  // warps splitting K per row group: the smallest power of two up to 8 that gives about
  // OA_MMA_WARPS_PER_SM warps per multiprocessor while each warp keeps STAGES quads or more
  const int64_t want = int64_t{OA_MMA_WARPS_PER_SM} * device_info().sms, row_warps = (d.N + 16 * R - 1) / (16 * R);
  const int64_t nq = (d.nch + 3) / 4;
  int ks = 1;
  while (ks < 8 && row_warps * ks < want && nq >= int64_t{2} * S * ks) ks *= 2;
  if (OA_MMA_KSPLIT) ks = OA_MMA_KSPLIT;
  const int64_t rows = int64_t{16} * R * (8 / ks);
  // the rings of 8 warps (the K-split sums reuse them: 8 * R * 512 bytes, less than any ring)
  const size_t smem = size_t{8} * S * MmaStage<BITS, R>::bytes(static_cast<int>(d.M));
  constexpr bool F = OA_MMA_FOLD != 0;
  const auto kernel = d.scales_half ? gemv_mma_kernel<BITS, R, S, true, F> : gemv_mma_kernel<BITS, R, S, false, F>;
  static bool attr_set[2] = {};  // more than 48 KiB of dynamic shared memory must be asked for
  if (!attr_set[d.scales_half]) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 8 * S * MmaStage<BITS, R>::bytes(8));
    attr_set[d.scales_half] = true;
  }
  const dim3 grid(static_cast<unsigned>((d.N + rows - 1) / rows)), block(256);
  kernel<<<grid, block, smem, stream>>>(d, ks, x, bias, y);
}

template <typename T>
cudaError_t launch(const OaCudaArgs& a, cudaStream_t stream) {
  Dev d{a.b, a.scales, a.zp, a.codebook, a.M, a.K, a.N, a.block_size, 0, 0, a.bits, -1, a.scales_half != 0};
  d.nb = (a.K + a.block_size - 1) / a.block_size;
  d.nch = (a.K + kChunk - 1) / kChunk;
  d.bs_log2 = -1;
  if (a.block_size < a.K)
    while ((int64_t{1} << (d.bs_log2 + 1)) <= a.block_size) ++d.bs_log2;
  const T* x = static_cast<const T*>(a.x);
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  if constexpr (std::is_same_v<T, __half>) {
    if (mma_eligible(a)) {
      switch (a.bits) {
        case 2: launch_gemv_mma<2>(d, x, bias, y, stream); break;
        case 3: launch_gemv_mma<3>(d, x, bias, y, stream); break;
        case 4: launch_gemv_mma<4>(d, x, bias, y, stream); break;
        case 5: launch_gemv_mma<5>(d, x, bias, y, stream); break;
        case 6: launch_gemv_mma<6>(d, x, bias, y, stream); break;
        case 7: launch_gemv_mma<7>(d, x, bias, y, stream); break;
        case 8: launch_gemv_mma<8>(d, x, bias, y, stream); break;
        default: return cudaErrorInvalidValue;
      }
      return cudaGetLastError();
    }
  }
  if (a.M <= 4) {
    switch (a.bits) {
      case 2: launch_gemv<2, T>(d, x, bias, y, stream); break;
      case 3: launch_gemv<3, T>(d, x, bias, y, stream); break;
      case 4: launch_gemv<4, T>(d, x, bias, y, stream); break;
      case 5: launch_gemv<5, T>(d, x, bias, y, stream); break;
      case 6: launch_gemv<6, T>(d, x, bias, y, stream); break;
      case 7: launch_gemv<7, T>(d, x, bias, y, stream); break;
      case 8: launch_gemv<8, T>(d, x, bias, y, stream); break;
      default: return cudaErrorInvalidValue;
    }
  } else {
    const dim3 grid(static_cast<unsigned>((a.N + 31) / 32), static_cast<unsigned>((a.M + 31) / 32));
    gemm_kernel<T><<<grid, 256, 0, stream>>>(d, x, bias, y);
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" int oa_lowbit_matmul_cuda(const OaCudaArgs* a, void* stream) {
  if (!a || a->bits < 2 || a->bits > 8 || a->K < 1 || a->N < 1 || a->M < 0 || a->block_size < 1)
    return static_cast<int>(cudaErrorInvalidValue);
  if (a->M == 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return static_cast<int>(a->x_half ? launch<__half>(*a, s) : launch<float>(*a, s));
}

extern "C" const char* oa_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

extern "C" int oa_has_cuda(void) { return 1; }
