// AVX2 + FMA kernels (this file alone is compiled with -mavx2 -mfma -mf16c; the dispatcher checks the CPU).
//
// M < 4 (decode): one fused pass per output row: unpack 32 codes with the plane decoder (see lowbit.h),
//   then either fp32 FMA against X (accuracy_level 0..3) or, for accuracy_level 4 and int codes of up to
//   7 bits, u8 x s8 integer dot products against X quantized to int8 per segment of <= 128 values.
//   Zero points are folded out of the inner loop: sum_k (q - zp) s x = s (sum_k q x - zp sum_k x).
// M >= 4 (prefill): dequantize 4 weight rows to fp32 and run a 2x4 register-blocked dot kernel over M.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "lowbit.h"

namespace oa {
namespace {

// ---- decoding ------------------------------------------------------------------------------------------
// One plane of width W -> 32 bytes (byte j = the plane's bits of value j). The shift count depends only on
// the lane, which is what the layout is designed for.
template <int W>
inline __m256i plane(const uint8_t* p);

template <>
inline __m256i plane<8>(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
template <>
inline __m256i plane<4>(const uint8_t* p) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
}
template <>
inline __m256i plane<2>(const uint8_t* p) {
  int64_t w;
  std::memcpy(&w, p, 8);
  const __m256i v = _mm256_srlv_epi64(_mm256_set1_epi64x(w), _mm256_setr_epi64x(0, 2, 4, 6));
  return _mm256_and_si256(v, _mm256_set1_epi8(0x03));
}
template <>
inline __m256i plane<1>(const uint8_t* p) {
  int32_t w;
  std::memcpy(&w, p, 4);
  const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(w), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_and_si256(v, _mm256_set1_epi8(0x01));
}

template <int BITS>
inline __m256i decode32(const uint8_t* p) {
  constexpr int w0 = plane_width(BITS, 0), w1 = plane_width(BITS, 1), w2 = plane_width(BITS, 2);
  __m256i v = plane<w0>(p);
  // Plane values are < 2^w and w + shift <= 8, so a 16-bit shift never carries into the next byte.
  if constexpr (w1 != 0) v = _mm256_or_si256(v, _mm256_slli_epi16(plane<w1>(p + 4 * w0), w0));
  if constexpr (w2 != 0) v = _mm256_or_si256(v, _mm256_slli_epi16(plane<w2>(p + 4 * (w0 + w1)), w0 + w1));
  return v;
}

// 32 code bytes -> 4 x 8 int32 lanes (values 0-7, 8-15, 16-23, 24-31).
inline void widen(__m256i c, __m256i out[4]) {
  const __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
  out[0] = _mm256_cvtepu8_epi32(lo);
  out[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
  out[2] = _mm256_cvtepu8_epi32(hi);
  out[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
}

// Code -> float value: the integer itself, or a codebook entry.
struct IntValue {
  explicit IntValue(const float*) {}
  __m256 operator()(__m256i i) const { return _mm256_cvtepi32_ps(i); }
};

template <int BITS>
struct CodebookValue {
  __m256 lo, hi;
  const float* cb;
  explicit CodebookValue(const float* c) : cb(c) {
    float t[16] = {0};
    std::memcpy(t, c, sizeof(float) * std::min(16, 1 << BITS));
    lo = _mm256_loadu_ps(t);
    hi = _mm256_loadu_ps(t + 8);
  }
  __m256 operator()(__m256i i) const {
    if constexpr (BITS <= 3) {
      return _mm256_permutevar8x32_ps(lo, i);
    } else if constexpr (BITS == 4) {
      // permutevar uses the low 3 index bits; bit 3 (moved to the sign bit) picks the table half.
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, i), _mm256_permutevar8x32_ps(hi, i),
                              _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
    } else {
      return _mm256_i32gather_ps(cb, i, 4);
    }
  }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- per-call preparation ------------------------------------------------------------------------------
struct Prep {
  bool int8 = false;          // accuracy_level 4 path
  int64_t seg_chunks = 1;     // chunks per int8 activation segment
  std::vector<int8_t> xq;     // [M, K_pad]
  std::vector<float> sx;      // [M, n_seg]
  std::vector<float> xsum;    // [M, n_blocks]: sum of x (or of dequantized int8 x) over each block
};

// Chunks per weight block in the fused loop; 0 means "block of 16: two blocks per chunk".
int64_t chunks_per_block(const GemmShape& sh) {
  if (sh.block_size >= sh.K) return sh.n_chunks();
  if (sh.block_size == 16) return 0;
  return sh.block_size / kChunk;
}

// ---- fused decode kernels (M < 4) ----------------------------------------------------------------------
template <int BITS, class V>
float row_dot_f32(const uint8_t* row, const float* x, const float* s, const GemmShape& sh, const V& val) {
  const int64_t nch = sh.n_chunks();
  const int64_t cpb = chunks_per_block(sh);
  constexpr int64_t cb = 4 * BITS;
  __m256 total = _mm256_setzero_ps();
  __m256i q[4];
  if (cpb == 0) {
    const int64_t nb = sh.n_blocks();
    for (int64_t c = 0; c < nch; ++c) {
      widen(decode32<BITS>(row + c * cb), q);
      const float* xc = x + c * kChunk;
      __m256 a = _mm256_mul_ps(val(q[0]), _mm256_loadu_ps(xc));
      a = _mm256_fmadd_ps(val(q[1]), _mm256_loadu_ps(xc + 8), a);
      total = _mm256_fmadd_ps(a, _mm256_set1_ps(s[2 * c]), total);
      if (2 * c + 1 < nb) {
        __m256 b = _mm256_mul_ps(val(q[2]), _mm256_loadu_ps(xc + 16));
        b = _mm256_fmadd_ps(val(q[3]), _mm256_loadu_ps(xc + 24), b);
        total = _mm256_fmadd_ps(b, _mm256_set1_ps(s[2 * c + 1]), total);
      }
    }
    return hsum(total);
  }
  int64_t c = 0;
  for (int64_t blk = 0; c < nch; ++blk) {
    const int64_t cend = std::min(nch, c + cpb);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; c < cend; ++c) {
      widen(decode32<BITS>(row + c * cb), q);
      const float* xc = x + c * kChunk;
      a0 = _mm256_fmadd_ps(val(q[0]), _mm256_loadu_ps(xc), a0);
      a1 = _mm256_fmadd_ps(val(q[1]), _mm256_loadu_ps(xc + 8), a1);
      a0 = _mm256_fmadd_ps(val(q[2]), _mm256_loadu_ps(xc + 16), a0);
      a1 = _mm256_fmadd_ps(val(q[3]), _mm256_loadu_ps(xc + 24), a1);
    }
    total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(s[blk]), total);
  }
  return hsum(total);
}

// sum_k q_k * xq_k * sx(seg) * s(blk): u8 codes (<= 127) x s8 activations, no int16 saturation.
template <int BITS>
float row_dot_i8(const uint8_t* row, const int8_t* xq, const float* sx, const float* s, const GemmShape& sh,
                 int64_t seg_chunks) {
  const int64_t nch = sh.n_chunks();
  const int64_t nb = sh.n_blocks();
  const bool per_16 = chunks_per_block(sh) == 0;
  const bool one_block = sh.block_size >= sh.K;
  constexpr int64_t cb = 4 * BITS;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 total = _mm256_setzero_ps();
  int64_t c = 0;
  for (int64_t seg = 0; c < nch; ++seg) {
    const int64_t cend = std::min(nch, c + seg_chunks);
    const int64_t k0 = c * kChunk;
    __m256i acc = _mm256_setzero_si256();
    for (; c < cend; ++c) {
      const __m256i codes = decode32<BITS>(row + c * cb);
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + c * kChunk));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), ones));
    }
    __m256 scale;
    if (per_16) {  // one chunk per segment; lanes 0-3 are block 2c, lanes 4-7 block 2c+1
      const int64_t b0 = k0 / 16;
      const float s0 = s[b0] * sx[seg], s1 = b0 + 1 < nb ? s[b0 + 1] * sx[seg] : 0.0f;
      scale = _mm256_setr_ps(s0, s0, s0, s0, s1, s1, s1, s1);
    } else {
      scale = _mm256_set1_ps(s[one_block ? 0 : k0 / sh.block_size] * sx[seg]);
    }
    total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), scale, total);
  }
  return hsum(total);
}

// ---- dequantize + register-blocked GEMM (M >= 4) -------------------------------------------------------
template <int BITS, class V>
void dequant_row(const uint8_t* row, const float* s, const float* zp, const GemmShape& sh, const V& val,
                 float* w) {
  const int64_t nch = sh.n_chunks();
  const bool one_block = sh.block_size >= sh.K;
  __m256i q[4];
  for (int64_t c = 0; c < nch; ++c) {
    widen(decode32<BITS>(row + c * 4 * BITS), q);
    for (int g = 0; g < 4; ++g) {
      const int64_t k0 = c * kChunk + 8 * g;
      if (k0 >= sh.K) {  // padding: no block (and no scale) exists here
        _mm256_storeu_ps(w + k0, _mm256_setzero_ps());
        continue;
      }
      const int64_t blk = one_block ? 0 : k0 / sh.block_size;
      __m256 v = val(q[g]);
      if (zp) v = _mm256_sub_ps(v, _mm256_set1_ps(zp[blk]));
      _mm256_storeu_ps(w + k0, _mm256_mul_ps(v, _mm256_set1_ps(s[blk])));
    }
  }
}

// y[m, n0 + r] for r < 4 rows of w (rows past `rows` alias row 0 and are dropped).
void gemm_tile(const float* x, int64_t M, int64_t kpad, const float* const w[4], int rows, const float* bias,
               int64_t n0, int64_t N, float* y) {
  int64_t m = 0;
  for (; m + 1 < M; m += 2) {
    __m256 acc[2][4];
    for (auto& a : acc)
      for (auto& v : a) v = _mm256_setzero_ps();
    const float* x0 = x + m * kpad;
    const float* x1 = x0 + kpad;
    for (int64_t k = 0; k < kpad; k += 8) {
      const __m256 xa = _mm256_loadu_ps(x0 + k), xb = _mm256_loadu_ps(x1 + k);
      for (int r = 0; r < 4; ++r) {
        const __m256 wv = _mm256_loadu_ps(w[r] + k);
        acc[0][r] = _mm256_fmadd_ps(xa, wv, acc[0][r]);
        acc[1][r] = _mm256_fmadd_ps(xb, wv, acc[1][r]);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const float b = bias ? bias[n0 + r] : 0.0f;
      y[m * N + n0 + r] = hsum(acc[0][r]) + b;
      y[(m + 1) * N + n0 + r] = hsum(acc[1][r]) + b;
    }
  }
  for (; m < M; ++m) {
    __m256 acc[4];
    for (auto& v : acc) v = _mm256_setzero_ps();
    const float* x0 = x + m * kpad;
    for (int64_t k = 0; k < kpad; k += 8) {
      const __m256 xa = _mm256_loadu_ps(x0 + k);
      for (int r = 0; r < 4; ++r) acc[r] = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w[r] + k), acc[r]);
    }
    for (int r = 0; r < rows; ++r) y[m * N + n0 + r] = hsum(acc[r]) + (bias ? bias[n0 + r] : 0.0f);
  }
}

template <int BITS, class V>
void rows_impl(const CpuProblem& p, int64_t n0, int64_t n1, const Prep& pr) {
  const GemmShape& sh = p.shape;
  const int64_t nb = sh.n_blocks();
  const int64_t kpad = sh.n_chunks() * kChunk;
  const int64_t rb = sh.row_bytes();
  const V val(p.codebook);
  if (sh.M >= 4) {
    static thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(4 * kpad));
    for (int64_t n = n0; n < n1; n += 4) {
      const int rows = static_cast<int>(std::min<int64_t>(4, n1 - n));
      const float* w[4];
      for (int r = 0; r < 4; ++r) {
        w[r] = buf.data() + (r < rows ? r : 0) * kpad;
        if (r < rows)
          dequant_row<BITS>(p.b + (n + r) * rb, p.scales + (n + r) * nb, p.zp ? p.zp + (n + r) * nb : nullptr,
                            sh, val, buf.data() + r * kpad);
      }
      gemm_tile(p.x, sh.M, kpad, w, rows, p.bias, n, sh.N, p.y);
    }
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.b + n * rb;
    const float* s = p.scales + n * nb;
    for (int64_t m = 0; m < sh.M; ++m) {
      float acc;
      if constexpr (BITS <= 7 && std::is_same_v<V, IntValue>) {
        if (pr.int8) {
          const int64_t nseg = pr.sx.size() / static_cast<size_t>(sh.M);
          acc = row_dot_i8<BITS>(row, pr.xq.data() + m * kpad, pr.sx.data() + m * nseg, s, sh, pr.seg_chunks);
        } else {
          acc = row_dot_f32<BITS>(row, p.x + m * kpad, s, sh, val);
        }
      } else {
        acc = row_dot_f32<BITS>(row, p.x + m * kpad, s, sh, val);
      }
      if (p.zp) {  // fold the zero points back in: - sum_b s_b zp_b sum_{k in b} x_k
        const float* xs = pr.xsum.data() + m * nb;
        const float* z = p.zp + n * nb;
        float corr = 0.0f;
        for (int64_t b = 0; b < nb; ++b) corr += s[b] * z[b] * xs[b];
        acc -= corr;
      }
      p.y[m * sh.N + n] = acc + (p.bias ? p.bias[n] : 0.0f);
    }
  }
}

template <int BITS>
void dispatch_value(const CpuProblem& p, int64_t n0, int64_t n1, const Prep& pr) {
  if (p.codebook)
    rows_impl<BITS, CodebookValue<BITS>>(p, n0, n1, pr);
  else
    rows_impl<BITS, IntValue>(p, n0, n1, pr);
}

}  // namespace

void* avx2_prepare(const CpuProblem& p) {
  auto* pr = new Prep();
  const GemmShape& sh = p.shape;
  // maddubs needs codes <= 127 to stay clear of int16 saturation: 8-bit codes keep the fp32 path.
  pr->int8 = sh.M < 4 && p.accuracy_level == 4 && !p.codebook && sh.bits <= 7;
  const int64_t kpad = sh.n_chunks() * kChunk;
  const int64_t nb = sh.n_blocks();
  if (sh.M >= 4) return pr;
  const int64_t cpb = chunks_per_block(sh);
  pr->seg_chunks = cpb == 0 ? 1 : std::min<int64_t>(cpb, 4);
  const int64_t nseg = (sh.n_chunks() + pr->seg_chunks - 1) / pr->seg_chunks;
  const int64_t seg_len = pr->seg_chunks * kChunk;
  pr->xsum.assign(static_cast<size_t>(sh.M * nb), 0.0f);
  if (pr->int8) {
    pr->xq.assign(static_cast<size_t>(sh.M * kpad), 0);
    pr->sx.assign(static_cast<size_t>(sh.M * nseg), 0.0f);
  }
  for (int64_t m = 0; m < sh.M; ++m) {
    const float* x = p.x + m * kpad;
    float* xs = pr->xsum.data() + m * nb;
    if (!pr->int8) {
      for (int64_t k = 0; k < sh.K; ++k) xs[k / sh.block_size] += x[k];
      continue;
    }
    // Symmetric int8 per segment; the zero-point term uses the same rounded values as the dot product.
    for (int64_t sg = 0; sg < nseg; ++sg) {
      const int64_t k0 = sg * seg_len, k1 = std::min(sh.K, k0 + seg_len);
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(x[k]));
      const float scale = amax / 127.0f;
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      pr->sx[m * nseg + sg] = scale;
      int8_t* q = pr->xq.data() + m * kpad;
      for (int64_t k = k0; k < k1; ++k) {
        const float r = std::nearbyint(x[k] * inv);
        q[k] = static_cast<int8_t>(r);
        xs[k / sh.block_size] += r * scale;
      }
    }
  }
  return pr;
}

void avx2_release(void* prep) { delete static_cast<Prep*>(prep); }

void avx2_rows(const CpuProblem& p, int64_t n0, int64_t n1, const void* prep) {
  const Prep& pr = *static_cast<const Prep*>(prep);
  switch (p.shape.bits) {
    case 2: dispatch_value<2>(p, n0, n1, pr); break;
    case 3: dispatch_value<3>(p, n0, n1, pr); break;
    case 4: dispatch_value<4>(p, n0, n1, pr); break;
    case 5: dispatch_value<5>(p, n0, n1, pr); break;
    case 6: dispatch_value<6>(p, n0, n1, pr); break;
    case 7: dispatch_value<7>(p, n0, n1, pr); break;
    default: dispatch_value<8>(p, n0, n1, pr); break;
  }
}

// fp16 <-> fp32 with F16C (used by the op for X, scales, bias and Y).
void avx2_half_to_float(const uint16_t* src, float* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

void avx2_float_to_half(const float* src, uint16_t* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

}  // namespace oa
