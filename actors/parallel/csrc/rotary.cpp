// Rotary position embedding of a token's heads in one call, bit for bit as
// rotary.apply_rotary computes it with torch's elementwise operators:
//   out = x * cos + rotate_half(x) * sin,  rotate_half(x) = (-x[half:], x[:half])
// each product and the sum rounded to x's dtype (torch rounds a bf16
// operator's float32 result before the next one reads it).
//
// x: [tokens, heads, dim], each head's dim contiguous, with the given token
// and head strides (a view into the fused QKV projection's output); cos, sin:
// [tokens, dim], contiguous, x's dtype; out: [tokens, heads, dim], contiguous.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "block_common.h"

namespace {

using specray::load8;
using specray::round_to;
using specray::store8;

template <typename T>
void rotate(const T* x, const T* cos, const T* sin, T* out, int64_t tokens, int64_t heads,
            int64_t dim, int64_t token_stride, int64_t head_stride, int threads) {
  const int64_t half = dim / 2;
  const __m256 sign = _mm256_set1_ps(-0.0f);
#pragma omp parallel for num_threads(tokens > 1 ? threads : 1) schedule(static)
  for (int64_t t = 0; t < tokens; ++t) {
    const T* c = cos + t * dim;
    const T* s = sin + t * dim;
    for (int64_t h = 0; h < heads; ++h) {
      const T* in = x + t * token_stride + h * head_stride;
      T* y = out + (t * heads + h) * dim;
      for (int64_t i = 0; i < dim; i += 8) {
        // The rotated partner of lane i: -x[i + half] in the first half, x[i - half] after.
        const __m256 partner = i < half ? _mm256_xor_ps(sign, load8(in + i + half))
                                        : load8(in + i - half);
        const __m256 straight = round_to(_mm256_mul_ps(load8(in + i), load8(c + i)), y);
        const __m256 turned = round_to(_mm256_mul_ps(partner, load8(s + i)), y);
        store8(_mm256_add_ps(straight, turned), y + i);
      }
    }
  }
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for what it does not take (the caller keeps
// torch's path). Dtype codes: 0 float32, 1 bfloat16.
int specray_rotary(const void* x, int dtype, const void* cos, const void* sin, void* out,
                   int64_t tokens, int64_t heads, int64_t dim, int64_t token_stride,
                   int64_t head_stride, int threads) {
  if (dim % 16) return 1;  // each half whole lanes of eight
  if (dtype == 0)
    rotate(static_cast<const float*>(x), static_cast<const float*>(cos),
           static_cast<const float*>(sin), static_cast<float*>(out), tokens, heads, dim,
           token_stride, head_stride, threads);
  else if (dtype == 1)
    rotate(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(cos),
           static_cast<const uint16_t*>(sin), static_cast<uint16_t*>(out), tokens, heads, dim,
           token_stride, head_stride, threads);
  else
    return 1;
  return 0;
}

}  // extern "C"
