// CPU-only builds: the C entry points of lowbit_cuda.cu exist but report that there are no CUDA kernels.
#include "../cuda/lowbit_cuda.h"

extern "C" int oa_lowbit_matmul_cuda(const OaCudaArgs*, void*) { return -1; }
extern "C" const char* oa_cuda_error_string(int) { return "library built without CUDA kernels"; }
extern "C" int oa_has_cuda(void) { return 0; }
