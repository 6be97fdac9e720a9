// Attention one query row at a time, each over exactly the keys its mask lets
// it see, in one fixed order of operations: a row's output depends on that
// row's query and visible keys and values alone. How many other rows share
// the call (a k-token verify or one decode), how long the padded context is,
// and how many masked keys follow it change nothing, bit for bit; batched
// matmuls and softmax reduce over the padded context in blockings that move
// with its length, so a verify and the decodes it stands for could round
// differently and break greedy equality at near-ties.
//
// Queries come packed, as the layers make them: q, out: [tokens, heads,
// head_dim], contiguous. Token t is row query_rows[t] = b * rows + i of the
// padded batch: sequence b, its i-th new token. Keys and values are read
// where they lie, a whole KV cache layer [blocks, kv_heads, length, head_dim]
// with the given block and head strides (rows of head_dim contiguous):
// sequence b reads block kv_blocks[b], so no gather copies a sequence's keys
// out first. mask: [batch, rows, context] bytes, nonzero = visible; keys
// past context are never read. Query head h reads KV head h / (heads /
// kv_heads).
//
// One work item is a token's query heads that share a KV head, so each key
// and value is loaded once for all of them. Arithmetic in float32, per query
// row and head, the same whatever else is in the call:
//   score(j) = dot(q, key j) * scale: two chains over the head's 8-lane
//              vectors, added, then the 8 lanes summed pairwise;
//   p(j) = exp(score(j) - max over visible scores) (exp8 below), 0 if masked;
//   out = (sum over visible j in key order of p(j) * value j) / sum p, the
//         sum of p in 8 lanes by the key's rank among the visible keys
//         mod 8, then pairwise. For a causal row (visible keys 0..n-1) the
//         rank is the position; for a tree node whose ancestors lie apart
//         in the cache it is where the key sits once the accepted path is
//         moved into place, so the node's output equals that decode's.
// Scores are computed for whole blocks of 8 key positions; a masked key's
// score is never read, and a block with no visible key is skipped.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <vector>

#include "block_common.h"

namespace {

using specray::load8;
using specray::sum8;

constexpr int kMaxHeadDim = 256;
constexpr int kMaxGroup = 16;  // query heads per KV head
constexpr int kScoreHeads = 4;  // heads whose dot products share one pass over a key
constexpr int kValueHeads = 8;  // heads whose weighted sums share one pass over the values
constexpr int kValueVectors = 2;  // 8-lane vectors of a value row per pass

struct Layout {
  int64_t tokens, heads, kv_heads, dim;
  const int64_t* query_rows;  // [tokens]
  const int64_t* kv_blocks;   // [batch]
  int64_t k_block, k_head, v_block, v_head;
  int64_t rows, context;
};

// exp of 8 lanes: 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 in two
// parts, e^r by a degree-6 polynomial (within 2 ulp of expf); below -87.3 it
// is 0, so a masked score of -inf gives 0. Lane by lane, the same value
// whatever the other lanes hold.
inline __m256 exp8(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.33654f);
  const __m256 zero_out = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(x, low);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.37626f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.3981999507e-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(8.3334519073e-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(4.1665795894e-2f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459e-1f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(5.0000001201e-1f));
  poly = _mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i exponent = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 scaled = _mm256_mul_ps(poly, _mm256_castsi256_ps(exponent));
  return _mm256_andnot_ps(zero_out, scaled);
}

// Eight vectors' lane sums, one per lane: lane k is ((v_k[0] + v_k[1]) +
// (v_k[2] + v_k[3])) + ((v_k[4] + v_k[5]) + (v_k[6] + v_k[7])).
inline __m256 lane_sums(const __m256* v) {
  const __m256 s01 = _mm256_hadd_ps(v[0], v[1]);
  const __m256 s23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 s45 = _mm256_hadd_ps(v[4], v[5]);
  const __m256 s67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 t0 = _mm256_hadd_ps(s01, s23);
  const __m256 t1 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

inline bool any_visible(const uint8_t* visible) {
  uint64_t eight;
  memcpy(&eight, visible, sizeof eight);
  return eight != 0;
}

// Whether the visible keys are exactly positions [0, n) for some n (a
// causal row): then a key's rank among them is its position. Every row of
// every layer asks, so the leading run is read 8 mask bytes (bools, 0 or 1)
// at a time.
inline bool visible_from_start(const uint8_t* visible, int64_t context) {
  constexpr uint64_t kAllVisible = 0x0101010101010101ull;
  int64_t j = 0;
  for (; j + 8 <= context; j += 8) {
    uint64_t eight;
    memcpy(&eight, visible + j, sizeof eight);
    if (eight != kAllVisible) break;
  }
  while (j < context && visible[j]) ++j;
  for (; j + 8 <= context; j += 8)
    if (any_visible(visible + j)) return false;
  for (; j < context; ++j)
    if (visible[j]) return false;
  return true;
}

// The visible weights summed in 8 lanes by rank among the visible keys, then
// pairwise: the sum a causal row makes by position, for any visible set.
inline float sum_by_rank(const float* weights, const uint8_t* visible, int64_t context) {
  __m256 sum = _mm256_setzero_ps();
  alignas(32) float lanes[8];
  int filled = 0;
  for (int64_t j = 0; j < context; ++j) {
    if (!visible[j]) continue;
    lanes[filled++] = weights[j];
    if (filled == 8) {
      sum = _mm256_add_ps(sum, _mm256_load_ps(lanes));
      filled = 0;
    }
  }
  if (filled) {
    for (int e = filled; e < 8; ++e) lanes[e] = 0.0f;
    sum = _mm256_add_ps(sum, _mm256_load_ps(lanes));
  }
  return sum8(sum);
}

// Scores of H heads (queries, one row of dim each) for the 8 keys at key0,
// masked to -inf: into scores, one row of stride per head.
template <int H, typename KV>
inline void score_heads(const float* queries, int64_t dim, const KV* key0, __m256 hidden,
                        float scale, float* scores, int64_t stride) {
  const int64_t vectors = dim / 8;
  __m256 dots[H][8];
  for (int key = 0; key < 8; ++key) {
    const KV* k_row = key0 + key * dim;
    __m256 chains[H][2];
#pragma GCC unroll 8
    for (int r = 0; r < H; ++r) chains[r][0] = chains[r][1] = _mm256_setzero_ps();
    for (int64_t t = 0; t < vectors; t += 2) {
      const __m256 even = load8(k_row + 8 * t);
      const __m256 odd = load8(k_row + 8 * t + 8);
#pragma GCC unroll 8
      for (int r = 0; r < H; ++r) {
        const float* query = queries + r * dim + 8 * t;
        chains[r][0] = _mm256_fmadd_ps(_mm256_load_ps(query), even, chains[r][0]);
        chains[r][1] = _mm256_fmadd_ps(_mm256_load_ps(query + 8), odd, chains[r][1]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < H; ++r) dots[r][key] = _mm256_add_ps(chains[r][0], chains[r][1]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < H; ++r) {
    const __m256 s = _mm256_mul_ps(lane_sums(dots[r]), _mm256_set1_ps(scale));
    _mm256_storeu_ps(scores + r * stride, _mm256_blendv_ps(s, _mm256_set1_ps(-INFINITY), hidden));
  }
}

// Scores of heads [0, count) of a group for the 8 keys at key0, kScoreHeads
// heads per pass over the keys.
template <typename KV>
inline void score_block(const float* queries, int64_t count, int64_t dim, const KV* key0,
                        const uint8_t* visible, float scale, float* scores, int64_t stride) {
  const __m256i shown =
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(visible)));
  const __m256 hidden = _mm256_castsi256_ps(_mm256_cmpeq_epi32(shown, _mm256_setzero_si256()));
  for (int64_t first = 0; first < count; first += kScoreHeads) {
    const float* q = queries + first * dim;
    float* out = scores + first * stride;
    switch (count - first < kScoreHeads ? count - first : kScoreHeads) {
      case 1: score_heads<1>(q, dim, key0, hidden, scale, out, stride); break;
      case 2: score_heads<2>(q, dim, key0, hidden, scale, out, stride); break;
      case 3: score_heads<3>(q, dim, key0, hidden, scale, out, stride); break;
      default: score_heads<4>(q, dim, key0, hidden, scale, out, stride); break;
    }
  }
}

// out rows of H heads: their weights (probs, one row of stride per head)
// times the visible values, in key order, divided by their totals.
template <int H, typename KV, typename Out>
inline void value_heads(const float* probs, int64_t stride, const float* totals, const KV* values,
                        const uint8_t* visible, int64_t dim, int64_t context, Out* out) {
  const int64_t vectors = dim / 8;
  for (int64_t t0 = 0; t0 < vectors; t0 += kValueVectors) {
    __m256 acc[H][kValueVectors];
#pragma GCC unroll 8
    for (int r = 0; r < H; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < context; ++j) {
      if (!visible[j]) continue;
      const __m256 first = load8(values + j * dim + 8 * t0);
      const __m256 second = load8(values + j * dim + 8 * t0 + 8);
#pragma GCC unroll 8
      for (int r = 0; r < H; ++r) {
        const __m256 weight = _mm256_broadcast_ss(probs + r * stride + j);
        acc[r][0] = _mm256_fmadd_ps(weight, first, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(weight, second, acc[r][1]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < H; ++r) {
      const __m256 norm = _mm256_set1_ps(totals[r]);
      specray::store8(_mm256_div_ps(acc[r][0], norm), out + r * dim + 8 * t0);
      specray::store8(_mm256_div_ps(acc[r][1], norm), out + r * dim + 8 * t0 + 8);
    }
  }
}

template <typename Q, typename KV, typename Out>
void attend_group(const Q* q, const KV* keys, const KV* values, const uint8_t* visible, Out* out,
                  int64_t group, int64_t dim, int64_t context, float scale, float* queries,
                  float* probs, int64_t stride, KV* tail_keys) {
  const int64_t vectors = dim / 8;
  const int64_t blocks = stride / 8;
  for (int64_t r = 0; r < group; ++r)
    for (int64_t t = 0; t < vectors; ++t)
      _mm256_store_ps(queries + r * dim + 8 * t, load8(q + r * dim + 8 * t));
  // Scores, blocks of 8 positions. A partial last block reads its keys from a
  // copy padded with zeros, and positions past context as hidden.
  alignas(8) uint8_t tail[8];
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t j0 = block * 8;
    const uint8_t* shown = visible + j0;
    const KV* key0 = keys + j0 * dim;
    if (j0 + 8 > context) {
      const size_t count = static_cast<size_t>(context - j0);
      memset(tail, 0, sizeof tail);
      memcpy(tail, shown, count);
      shown = tail;
      memset(tail_keys, 0, sizeof(KV) * 8 * dim);
      memcpy(tail_keys, key0, sizeof(KV) * count * dim);
      key0 = tail_keys;
    }
    if (!any_visible(shown)) {
      for (int64_t r = 0; r < group; ++r)
        _mm256_storeu_ps(probs + r * stride + j0, _mm256_set1_ps(-INFINITY));
      continue;
    }
    score_block(queries, group, dim, key0, shown, scale, probs + j0, stride);
  }
  // Softmax weights, and their sums, per head.
  alignas(32) float totals[kMaxGroup];
  const bool causal = visible_from_start(visible, context);
  for (int64_t r = 0; r < group; ++r) {
    float* row = probs + r * stride;
    __m256 top8 = _mm256_set1_ps(-INFINITY);
    for (int64_t block = 0; block < blocks; ++block)
      top8 = _mm256_max_ps(top8, _mm256_loadu_ps(row + 8 * block));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, top8);
    float top = lanes[0];
    for (int e = 1; e < 8; ++e) top = lanes[e] > top ? lanes[e] : top;
    const __m256 top_all = _mm256_set1_ps(top);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t block = 0; block < blocks; ++block) {
      const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + 8 * block), top_all));
      _mm256_storeu_ps(row + 8 * block, p);
      sum = _mm256_add_ps(sum, p);
    }
    totals[r] = causal ? sum8(sum) : sum_by_rank(row, visible, context);
  }
  // Values, in key order, kValueHeads heads at a time.
  for (int64_t first = 0; first < group; first += kValueHeads) {
    const float* p = probs + first * stride;
    const float* total = totals + first;
    Out* y = out + first * dim;
    switch (group - first < kValueHeads ? group - first : kValueHeads) {
      case 1: value_heads<1>(p, stride, total, values, visible, dim, context, y); break;
      case 2: value_heads<2>(p, stride, total, values, visible, dim, context, y); break;
      case 3: value_heads<3>(p, stride, total, values, visible, dim, context, y); break;
      case 4: value_heads<4>(p, stride, total, values, visible, dim, context, y); break;
      case 5: value_heads<5>(p, stride, total, values, visible, dim, context, y); break;
      case 6: value_heads<6>(p, stride, total, values, visible, dim, context, y); break;
      case 7: value_heads<7>(p, stride, total, values, visible, dim, context, y); break;
      default: value_heads<8>(p, stride, total, values, visible, dim, context, y); break;
    }
  }
}

template <typename Q, typename KV, typename Out>
void attend_rows(const Q* q, const KV* keys, const KV* values, const uint8_t* mask, Out* out,
                 const Layout& at, float scale, int threads) {
  const int64_t group = at.heads / at.kv_heads;
  const int64_t dim = at.dim;
  const int64_t stride = (at.context + 7) / 8 * 8;  // a head's scores, whole blocks
  const int64_t items = at.tokens * at.kv_heads;
#pragma omp parallel num_threads(items > 1 ? threads : 1)
  {
    std::vector<float> probs(static_cast<size_t>(group * stride));
    std::vector<KV> tail_keys(static_cast<size_t>(8 * dim));
    alignas(32) float queries[kMaxGroup * kMaxHeadDim];
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t token = item / at.kv_heads;
      const int64_t g = item % at.kv_heads;
      const int64_t padded = at.query_rows[token];
      const int64_t block = at.kv_blocks[padded / at.rows];
      const int64_t first_head = token * at.heads + g * group;
      attend_group(q + first_head * dim, keys + block * at.k_block + g * at.k_head,
                   values + block * at.v_block + g * at.v_head, mask + padded * at.context,
                   out + first_head * dim, group, dim, at.context, scale, queries, probs.data(),
                   stride, tail_keys.data());
    }
  }
}

template <typename Q, typename KV>
int with_out(const Q* q, const KV* k, const KV* v, const uint8_t* mask, void* out, int dtype,
             const Layout& at, float scale, int threads) {
  return specray::with_dtype(out, dtype, [&](auto* y) {
    attend_rows(q, k, v, mask, y, at, scale, threads);
    return 0;
  });
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for shapes or dtypes it does not take (the caller
// keeps torch's path). Dtype codes: 0 float32, 1 bfloat16; out has q's.
int specray_row_attention(const void* q, int q_dtype, int64_t tokens, int64_t heads,
                          int64_t head_dim, const int64_t* query_rows, const void* keys,
                          const void* values, int kv_dtype, int64_t kv_heads,
                          const int64_t* kv_blocks, int64_t k_block, int64_t k_head,
                          int64_t v_block, int64_t v_head, const uint8_t* mask, int64_t rows,
                          int64_t context, void* out, float scale, int threads) {
  if (head_dim % 16 || head_dim > kMaxHeadDim || kv_heads < 1 || heads % kv_heads) return 1;
  if (heads / kv_heads > kMaxGroup) return 1;
  if (q_dtype < 0 || q_dtype > 1 || kv_dtype < 0 || kv_dtype > 1 || rows < 1) return 1;
  const Layout at{tokens,  heads,  kv_heads, head_dim, query_rows, kv_blocks,
                  k_block, k_head, v_block,  v_head,   rows,       context};
  auto run = [&](const auto* qt) {
    if (kv_dtype == 0)
      return with_out(qt, static_cast<const float*>(keys), static_cast<const float*>(values),
                      mask, out, q_dtype, at, scale, threads);
    return with_out(qt, static_cast<const uint16_t*>(keys), static_cast<const uint16_t*>(values),
                    mask, out, q_dtype, at, scale, threads);
  };
  return q_dtype == 0 ? run(static_cast<const float*>(q)) : run(static_cast<const uint16_t*>(q));
}

}  // extern "C"
