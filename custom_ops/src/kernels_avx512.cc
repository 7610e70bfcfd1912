// AVX-512 VNNI build of the x86 kernels: the same 256-bit code, with vpdpbusd (EVEX, needs AVX512VL) for the
// int8 dot products of accuracy_level 4 (compiled with -mavx2 -mfma -mf16c -mavx512f -mavx512vl -mavx512bw
// -mavx512vnni).
#define OA_NS avx512vnni
#define OA_VNNI 1
#include "kernels_x86.inc"
