// Portable kernels: the fallback for CPUs without AVX2, and the dispatcher.
// Dequantize-then-dot with plain loops (the same numbers as QuantizedWeight.dequantize()).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "lowbit.h"

namespace oa {

const float* row_scales(const CpuProblem& p, int64_t n, float* buf) {
  const int64_t nb = p.shape.n_blocks();
  if (!p.scales_half) return static_cast<const float*>(p.scales) + n * nb;
  half_to_float(static_cast<const uint16_t*>(p.scales) + n * nb, buf, static_cast<size_t>(nb));
  return buf;
}

const float* row_zero_points(const CpuProblem& p, int64_t n, float* buf) {
  if (p.codebook) return nullptr;
  const int64_t nb = p.shape.n_blocks();
  if (p.zp) {
    const uint8_t* z = p.zp + n * nb;
    for (int64_t b = 0; b < nb; ++b) buf[b] = z[b];
  } else {
    std::fill(buf, buf + nb, static_cast<float>(1 << (p.shape.bits - 1)));
  }
  return buf;
}

Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::Scalar;
#if defined(OA_HAVE_X86) && (defined(__x86_64__) || defined(__i386__))
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      best = Isa::Avx2;
      if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
          __builtin_cpu_supports("avx512bw"))
        best = Isa::Avx512Vnni;
    }
#endif
    // OPTIMUM_ADAROUND_ISA=scalar|avx2 caps the choice (tests cover every family on one machine).
    if (const char* cap = std::getenv("OPTIMUM_ADAROUND_ISA")) {
      const std::string c(cap);
      const Isa want = c == "scalar" ? Isa::Scalar : c == "avx2" ? Isa::Avx2 : Isa::Avx512Vnni;
      if (static_cast<int>(want) < static_cast<int>(best)) best = want;
    }
    return best;
  }();
  return isa;
}

void scalar_rows(const CpuProblem& p, int64_t n0, int64_t n1) {
  const GemmShape& sh = p.shape;
  const int64_t kpad = sh.n_chunks() * kChunk;
  const int64_t nb = sh.n_blocks();
  std::vector<float> w(static_cast<size_t>(kpad), 0.0f), sbuf(nb), zbuf(nb);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.b + n * sh.row_bytes();
    const float* s = row_scales(p, n, sbuf.data());
    const float* z = row_zero_points(p, n, zbuf.data());
    for (int64_t k = 0; k < sh.K; ++k) {
      const uint8_t q = decode_one(row + (k / kChunk) * sh.chunk_bytes(), sh.bits, static_cast<int>(k % kChunk));
      const int64_t blk = k / sh.block_size;
      w[k] = p.codebook ? p.codebook[q] * s[blk] : (static_cast<float>(q) - z[blk]) * s[blk];
    }
    for (int64_t m = 0; m < sh.M; ++m) {
      const float* x = p.x + m * kpad;
      float acc = 0.0f;
      for (int64_t k = 0; k < sh.K; ++k) acc += x[k] * w[k];
      p.y[m * sh.N + n] = acc + (p.bias ? p.bias[n] : 0.0f);
    }
  }
}

namespace {

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    f = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    f = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits |= sign;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half_bits(float f) {
  // Round to nearest even through the exponent/mantissa fields; overflow saturates to inf.
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);
  if (ax < 0x38800000u) {  // subnormal or zero in fp16
    float a;
    std::memcpy(&a, &ax, 4);
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f)));
  }
  const uint32_t mant = ax + 0xC8000FFFu + ((ax >> 13) & 1u);  // rebias exponent (-112 << 23) and round
  return static_cast<uint16_t>(sign | (mant >> 13));
}

}  // namespace

void half_to_float(const uint16_t* src, float* dst, size_t n) {
#if defined(OA_HAVE_X86)
  if (cpu_isa() != Isa::Scalar) return avx2::half_to_float(src, dst, n);
#endif
  for (size_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(src[i]);
}

void float_to_half(const float* src, uint16_t* dst, size_t n) {
#if defined(OA_HAVE_X86)
  if (cpu_isa() != Isa::Scalar) return avx2::float_to_half(src, dst, n);
#endif
  for (size_t i = 0; i < n; ++i) dst[i] = float_to_half_bits(src[i]);
}

namespace {

struct Task {
  const CpuProblem* p;
  const void* prep;
  int64_t rows_per_task;
  Isa isa;
};

void run_task(void* ctx, size_t i) {
  const Task& t = *static_cast<const Task*>(ctx);
  const int64_t n0 = static_cast<int64_t>(i) * t.rows_per_task;
  const int64_t n1 = std::min(t.p->shape.N, n0 + t.rows_per_task);
  switch (t.isa) {
#if defined(OA_HAVE_X86)
    case Isa::Avx512Vnni: return avx512vnni::rows(*t.p, n0, n1, t.prep);
    case Isa::Avx2: return avx2::rows(*t.p, n0, n1, t.prep);
#endif
    default: return scalar_rows(*t.p, n0, n1);
  }
}

void* prepare(Isa isa, const CpuProblem& p) {
  switch (isa) {
#if defined(OA_HAVE_X86)
    case Isa::Avx512Vnni: return avx512vnni::prepare(p);
    case Isa::Avx2: return avx2::prepare(p);
#endif
    default: return nullptr;
  }
}

void release(Isa isa, void* prep) {
  switch (isa) {
#if defined(OA_HAVE_X86)
    case Isa::Avx512Vnni: return avx512vnni::release(prep);
    case Isa::Avx2: return avx2::release(prep);
#endif
    default: return;
  }
}

}  // namespace

void cpu_gemm(const CpuProblem& p, ParallelFor pfor, void* runner) {
  Task t{&p, nullptr, 0, cpu_isa()};
  t.prep = prepare(t.isa, p);
  // ~48-64 tasks give the pool room to balance; the GEMM path (M >= 4) wants whole 16-row panels.
  const int64_t N = p.shape.N;
  const int64_t unit = p.shape.M >= 4 ? 16 : 4;
  t.rows_per_task = std::max<int64_t>(unit, ((N + 47) / 48 + unit - 1) / unit * unit);
  const size_t total = static_cast<size_t>((N + t.rows_per_task - 1) / t.rows_per_task);
  pfor(runner, run_task, total, &t);
  release(t.isa, const_cast<void*>(t.prep));
}

}  // namespace oa
