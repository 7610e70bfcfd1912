// The two constants of the packed "lowbit v1" layout (described in lowbit.h), in one place for the CPU
// kernels and the CUDA kernels: nvcc compiles plane_width for host and device.
#pragma once

#if defined(__CUDACC__)
#define OA_HOST_DEVICE __host__ __device__
#else
#define OA_HOST_DEVICE
#endif

namespace oa {

constexpr int kChunk = 32;  // values per chunk

// Width of plane i of a `bits`-bit code: the binary digits of `bits`, widest first, 8 = one plane
// (0 = no more planes).
OA_HOST_DEVICE constexpr int plane_width(int bits, int i) {
  if (bits == 8) return i == 0 ? 8 : 0;
  for (int w = 4; w >= 1; w /= 2)
    if (bits & w) {
      if (i == 0) return w;
      --i;
    }
  return 0;
}
static_assert(plane_width(3, 0) == 2 && plane_width(3, 1) == 1 && plane_width(3, 2) == 0, "3 = 2 + 1");
static_assert(plane_width(7, 0) == 4 && plane_width(7, 1) == 2 && plane_width(7, 2) == 1, "7 = 4 + 2 + 1");

}  // namespace oa
