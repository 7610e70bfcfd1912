// C entry point of the CUDA kernels (lowbit_cuda.cu). Used by the op's CUDAExecutionProvider kernel, and
// exported from the library so a script can call it with ctypes on device pointers (benchmarks/cuda_gemv.py)
// without onnxruntime-gpu. Layout and math: include/lowbit.h.
#pragma once

#include <cstdint>

#if defined(_WIN32)
#define OA_C_EXPORT __declspec(dllexport)
#else
#define OA_C_EXPORT __attribute__((visibility("default")))
#endif

extern "C" {

struct OaCudaArgs {
  const void* x;         // [M, K] float32 or float16 (x_half), device
  const uint8_t* b;      // packed codes [N, n_chunks, 4 * bits], device
  const void* scales;    // [N, n_blocks] float32 or float16 (scales_half), device
  const uint8_t* zp;     // [N, n_blocks] uint8 or nullptr (symmetric / codebook), device
  const float* codebook; // [2^bits] float32 or nullptr (int codes), device
  const void* bias;      // [N], same type as x, or nullptr, device
  void* y;               // [M, N], same type as x, device
  int64_t M, K, N, block_size;
  int32_t bits, x_half, scales_half;
};

// Launches on `stream` (a cudaStream_t, nullptr = default stream); returns a cudaError_t value (0 = ok).
OA_C_EXPORT int oa_lowbit_matmul_cuda(const OaCudaArgs* args, void* stream);
// Message of a value returned above.
OA_C_EXPORT const char* oa_cuda_error_string(int code);
// 1 when the library was built with CUDA kernels (always defined; 0 in CPU-only builds).
OA_C_EXPORT int oa_has_cuda(void);
}
