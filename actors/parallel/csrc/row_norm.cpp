// RMSNorm of each row, a row at a time: the step torch runs as eight
// operators (about 20 us for one decode row on a 2-core machine) in one call.
//
// x, out: [rows, dim], contiguous, in the activations' dtype; weight: [dim].
// Arithmetic as torch's RMSNorm (norm.py) computes it, in float32:
//   normed = x * (1 / sqrt(sum(x * x) / dim + eps))
//   mode 0 (Llama, Qwen):   out = weight * round(normed), weight in x's dtype
//   mode 1 (Gemma 3):       out = round(normed * (1 + weight))
//   mode 2 (DeepSeek-V4):   out = round(weight * normed), weight in float32
// where round() is the cast to x's dtype and the outer product rounds to it
// as torch's elementwise operators do. Only the sum of squares runs in
// another order than torch's (eight lanes, then pairwise): it can move the
// last bit of a float32 scale, and so, rarely, one bf16 step of an output.
// A row's result depends on that row alone.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <cmath>

#include "block_common.h"

namespace {

using specray::load8;
using specray::round_to;
using specray::store8;
using specray::sum8;

template <typename T>
float sum_of_squares(const T* x, int64_t dim) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < dim; i += 8) {
    const __m256 v = load8(x + i);
    acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
  }
  return sum8(acc);
}

template <typename T, typename W>
void norm_rows(const T* x, const W* weight, T* out, int64_t rows, int64_t dim, float eps, int mode,
               int threads) {
#pragma omp parallel for num_threads(rows > 1 ? threads : 1) schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const T* in = x + row * dim;
    T* y = out + row * dim;
    const float mean = sum_of_squares(in, dim) / static_cast<float>(dim);
    const __m256 inverse = _mm256_set1_ps(1.0f / std::sqrt(mean + eps));
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t i = 0; i < dim; i += 8) {
      const __m256 normed = _mm256_mul_ps(load8(in + i), inverse);
      const __m256 w = load8(weight + i);
      __m256 value;
      if (mode == 0)
        value = _mm256_mul_ps(w, round_to(normed, y));
      else if (mode == 1)
        value = _mm256_mul_ps(normed, _mm256_add_ps(one, w));
      else
        value = _mm256_mul_ps(w, normed);
      store8(value, y + i);
    }
  }
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for what it does not take (the caller keeps
// torch's path). Dtype codes: 0 float32, 1 bfloat16; out has x's dtype.
int specray_rms_norm(const void* x, int x_dtype, const void* weight, int weight_dtype, void* out,
                     int64_t rows, int64_t dim, float eps, int mode, int threads) {
  if (dim % 8 || mode < 0 || mode > 2 || x_dtype < 0 || x_dtype > 1) return 1;
  // Mode 0 multiplies in x's dtype, mode 2 by a float32 weight.
  if ((mode == 0 && weight_dtype != x_dtype) || (mode == 2 && weight_dtype != 0)) return 1;
  auto run = [&](const auto* w) {
    if (x_dtype == 0)
      norm_rows(static_cast<const float*>(x), w, static_cast<float*>(out), rows, dim, eps, mode,
                threads);
    else
      norm_rows(static_cast<const uint16_t*>(x), w, static_cast<uint16_t*>(out), rows, dim, eps,
                mode, threads);
    return 0;
  };
  if (weight_dtype == 0) return run(static_cast<const float*>(weight));
  if (weight_dtype == 1) return run(static_cast<const uint16_t*>(weight));
  return 1;
}

}  // extern "C"
