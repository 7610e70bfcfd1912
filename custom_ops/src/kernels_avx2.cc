// AVX2 + FMA + F16C build of the x86 kernels (compiled with -mavx2 -mfma -mf16c).
#define OA_NS avx2
#define OA_VNNI 0
#include "kernels_x86.inc"
