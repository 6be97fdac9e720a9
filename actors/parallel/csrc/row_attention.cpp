// Attention one query row at a time, each over exactly the keys its mask lets
// it see, in one fixed order of operations: a row's output depends on that
// row's query and visible keys and values alone. How many other rows share
// the call (a k-token verify or one decode), how long the padded context is,
// and how many masked keys follow it change nothing, bit for bit; batched
// matmuls and softmax reduce over the padded context in blockings that move
// with its length, so a verify and the decodes it stands for could round
// differently and break greedy equality at near-ties.
//
// q, out: [batch, heads, rows, head_dim], contiguous; keys, values: [batch,
// kv_heads, context, head_dim] with the given batch and head strides (the KV
// cache's own views); mask: [batch, rows, context] bytes, nonzero = visible.
// Query head h reads KV head h / (heads / kv_heads). Arithmetic in float32:
// dot products in four fixed chains of 8 lanes, softmax with libm's expf,
// values summed in key order, divided by the softmax sum once.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <vector>

#include "block_common.h"

namespace {

using specray::store;

inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }

inline __m256 load8(const uint16_t* x) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

inline float sum8(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

constexpr int kMaxHeadDim = 256;

template <typename Q, typename KV, typename Out>
void attend_rows(const Q* q, const KV* keys, const KV* values, const uint8_t* mask, Out* out,
                 int64_t batch, int64_t heads, int64_t kv_heads, int64_t rows, int64_t context,
                 int64_t dim, int64_t k_batch, int64_t k_head, int64_t v_batch, int64_t v_head,
                 float scale, int threads) {
  const int64_t group = heads / kv_heads;
  const int64_t vectors = dim / 8;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> probs(static_cast<size_t>(context));
    alignas(32) float query[kMaxHeadDim];
#pragma omp for schedule(static)
    for (int64_t row = 0; row < batch * heads * rows; ++row) {
      const int64_t b = row / (heads * rows);
      const int64_t h = (row / rows) % heads;
      const int64_t i = row % rows;
      const Q* q_row = q + row * dim;
      for (int64_t t = 0; t < vectors; ++t) _mm256_store_ps(query + 8 * t, load8(q_row + 8 * t));
      const KV* k_head_at = keys + b * k_batch + (h / group) * k_head;
      const KV* v_head_at = values + b * v_batch + (h / group) * v_head;
      const uint8_t* visible = mask + (b * rows + i) * context;
      float top = -INFINITY;
      for (int64_t j = 0; j < context; ++j) {
        if (!visible[j]) continue;
        const KV* key = k_head_at + j * dim;
        __m256 chains[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                            _mm256_setzero_ps()};
        for (int64_t t = 0; t < vectors; ++t)
          chains[t % 4] = _mm256_fmadd_ps(_mm256_load_ps(query + 8 * t), load8(key + 8 * t),
                                          chains[t % 4]);
        const __m256 dot = _mm256_add_ps(_mm256_add_ps(chains[0], chains[1]),
                                         _mm256_add_ps(chains[2], chains[3]));
        const float score = sum8(dot) * scale;
        probs[j] = score;
        top = score > top ? score : top;
      }
      float total = 0.0f;
      __m256 acc[kMaxHeadDim / 8];
      for (int64_t t = 0; t < vectors; ++t) acc[t] = _mm256_setzero_ps();
      for (int64_t j = 0; j < context; ++j) {
        if (!visible[j]) continue;
        const float p = expf(probs[j] - top);
        total += p;
        const __m256 weight = _mm256_set1_ps(p);
        const KV* value = v_head_at + j * dim;
        for (int64_t t = 0; t < vectors; ++t)
          acc[t] = _mm256_fmadd_ps(weight, load8(value + 8 * t), acc[t]);
      }
      const __m256 norm = _mm256_set1_ps(total);
      Out* out_row = out + row * dim;
      for (int64_t t = 0; t < vectors; ++t) {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, _mm256_div_ps(acc[t], norm));
        for (int e = 0; e < 8; ++e) store(lanes[e], out_row + 8 * t + e);
      }
    }
  }
}

template <typename Q, typename KV>
int with_out(const Q* q, const KV* k, const KV* v, const uint8_t* mask, void* out, int dtype,
             int64_t batch, int64_t heads, int64_t kv_heads, int64_t rows, int64_t context,
             int64_t dim, int64_t kb, int64_t kh, int64_t vb, int64_t vh, float scale,
             int threads) {
  return specray::with_dtype(out, dtype, [&](auto* y) {
    attend_rows(q, k, v, mask, y, batch, heads, kv_heads, rows, context, dim, kb, kh, vb, vh,
                scale, threads);
    return 0;
  });
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for shapes or dtypes it does not take (the caller
// keeps torch's path). Dtype codes: 0 float32, 1 bfloat16; out has q's.
int specray_row_attention(const void* q, int q_dtype, const void* keys, const void* values,
                          int kv_dtype, const uint8_t* mask, void* out, int64_t batch,
                          int64_t heads, int64_t kv_heads, int64_t rows, int64_t context,
                          int64_t head_dim, int64_t k_batch, int64_t k_head, int64_t v_batch,
                          int64_t v_head, float scale, int threads) {
  if (head_dim % 8 || head_dim > kMaxHeadDim || kv_heads < 1 || heads % kv_heads) return 1;
  if (q_dtype < 0 || q_dtype > 1 || kv_dtype < 0 || kv_dtype > 1) return 1;
  auto run = [&](const auto* qt) {
    if (kv_dtype == 0)
      return with_out(qt, static_cast<const float*>(keys), static_cast<const float*>(values),
                      mask, out, q_dtype, batch, heads, kv_heads, rows, context, head_dim,
                      k_batch, k_head, v_batch, v_head, scale, threads);
    return with_out(qt, static_cast<const uint16_t*>(keys), static_cast<const uint16_t*>(values),
                    mask, out, q_dtype, batch, heads, kv_heads, rows, context, head_dim, k_batch,
                    k_head, v_batch, v_head, scale, threads);
  };
  return q_dtype == 0 ? run(static_cast<const float*>(q)) : run(static_cast<const uint16_t*>(q));
}

}  // extern "C"
