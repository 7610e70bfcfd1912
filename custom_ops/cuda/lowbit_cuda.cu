// CUDA kernels of MatMulLowBit / MatMulCodebook (layout: include/lowbit.h).
//
// GEMV (M <= 4): one warp per output row. Lane l takes chunks l, l+32, ...: a chunk is `bits` aligned
//   32-bit words, so a warp reads 32 consecutive chunks = one contiguous 128*bits-byte stretch per step
//   (coalesced). The decode of value j is a compile-time shift/mask per plane (BITS is a template).
// GEMM (M > 4): 32x32 output tile per 256-thread block; per 32-wide K step the block stages X and the
//   dequantized W tile in shared memory (rows padded to 33 floats against bank conflicts).
// Accumulation is fp32 everywhere; fp16 X/Y/bias/scales are converted on load/store.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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
  bool scales_half;
};

template <int J, int BITS, int MT, typename T>
struct ChunkDot {
  __device__ __forceinline__ static void run(const uint32_t* words, const T* x, int64_t K, int64_t M, int64_t k0,
                                             float s0, float z0, float s1, float z1, const float* cb,
                                             float (&acc)[MT]) {
    const uint32_t q = decode_ct<BITS, J>(words);
    const float s = J < 16 ? s0 : s1;
    const float w = cb ? cb[q] * s : (static_cast<float>(q) - (J < 16 ? z0 : z1)) * s;
    const int64_t k = k0 + J;
    if (k < K) {
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < M) acc[m] += w * to_f(x[m * K + k]);
    }
    ChunkDot<J + 1, BITS, MT, T>::run(words, x, K, M, k0, s0, z0, s1, z1, cb, acc);
  }
};
template <int BITS, int MT, typename T>
struct ChunkDot<kChunk, BITS, MT, T> {
  __device__ __forceinline__ static void run(const uint32_t*, const T*, int64_t, int64_t, int64_t, float, float,
                                             float, float, const float*, float (&)[MT]) {}
};

template <int BITS, typename T>
__global__ void gemv_kernel(Dev d, const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y) {
  constexpr int MT = 4;
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (n >= d.N) return;
  const uint32_t* row = reinterpret_cast<const uint32_t*>(d.b + n * d.nch * 4 * BITS);
  const float* cb = d.codebook;
  float acc[MT] = {0.f, 0.f, 0.f, 0.f};
  const float implied = static_cast<float>(1 << (BITS - 1));
  for (int64_t c = lane; c < d.nch; c += 32) {
    uint32_t words[BITS];
#pragma unroll
    for (int i = 0; i < BITS; ++i) words[i] = __ldg(row + c * BITS + i);
    const int64_t k0 = c * kChunk;
    // A chunk spans at most two blocks (block sizes >= 16): one for each half.
    const int64_t b0 = d.bs >= d.K ? 0 : k0 / d.bs;
    const int64_t b1 = d.bs >= d.K ? 0 : min((k0 + 16) / d.bs, d.nb - 1);
    const float s0 = load_scale(d.scales, n * d.nb + b0, d.scales_half);
    const float s1 = load_scale(d.scales, n * d.nb + b1, d.scales_half);
    const float z0 = d.zp ? static_cast<float>(d.zp[n * d.nb + b0]) : implied;
    const float z1 = d.zp ? static_cast<float>(d.zp[n * d.nb + b1]) : implied;
    ChunkDot<0, BITS, MT, T>::run(words, x, d.K, d.M, k0, s0, z0, s1, z1, cb, acc);
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0 && m < d.M) store(y + m * d.N + n, v + (bias ? to_f(bias[n]) : 0.f));
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

template <typename T>
cudaError_t launch(const OaCudaArgs& a, cudaStream_t stream) {
  Dev d{a.b, a.scales, a.zp, a.codebook, a.M, a.K, a.N, a.block_size, 0, 0, a.bits, a.scales_half != 0};
  d.nb = (a.K + a.block_size - 1) / a.block_size;
  d.nch = (a.K + kChunk - 1) / kChunk;
  const T* x = static_cast<const T*>(a.x);
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  if (a.M <= 4) {
    const int warps = 8;
    const dim3 grid(static_cast<unsigned>((a.N + warps - 1) / warps));
    switch (a.bits) {
      case 2: gemv_kernel<2, T><<<grid, 32 * warps, 0, stream>>>(d, x, bias, y); break;
      case 3: gemv_kernel<3, T><<<grid, 32 * warps, 0, stream>>>(d, x, bias, y); break;
      case 4: gemv_kernel<4, T><<<grid, 32 * warps, 0, stream>>>(d, x, bias, y); break;
      case 5: gemv_kernel<5, T><<<grid, 32 * warps, 0, stream>>>(d, x, bias, y); break;
      case 6: gemv_kernel<6, T><<<grid, 32 * warps, 0, stream>>>(d, x, bias, y); break;
      case 7: gemv_kernel<7, T><<<grid, 32 * warps, 0, stream>>>(d, x, bias, y); break;
      case 8: gemv_kernel<8, T><<<grid, 32 * warps, 0, stream>>>(d, x, bias, y); break;
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
