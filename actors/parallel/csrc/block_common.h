// What both block kernels share: the activation rounding and the output
// stores.
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <vector>

namespace specray {

constexpr int kBlock = 32;

inline void store(float value, float* out) { *out = value; }

inline void store(float value, uint16_t* out) {
  // bfloat16, rounded to nearest even as torch rounds it.
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
    *out = static_cast<uint16_t>((bits >> 16) | 0x40);
    return;
  }
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  *out = static_cast<uint16_t>(bits >> 16);
}

// Eight values widened to float32 lanes.
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }

inline __m256 load8(const uint16_t* x) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// Each 32-value block of each row to int8 on the scale max|x| / 127, rounded
// half to even (torch.round: vcvtps2dq under the default rounding mode); an
// all-zero block keeps scale 0. Also each half block's sum of codes, which
// the matmuls need for the weights' offsets. Vectorised because a verify
// of k rows rounds k times every activation of the model, on one thread
// unless the rows are many (a prefill), where a scalar loop was a visible
// share of the verify. IEEE division, so every code equals the scalar
// nearbyint(x / scale).
template <typename In>
void quantize(const In* x, int64_t rows, int64_t k, int8_t* codes, float* scales,
              int32_t* half_sums, int threads) {
  const int64_t count = rows * (k / kBlock);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  // Threads pay for themselves only on long runs of rows.
  const int team = rows * k >= (int64_t{1} << 16) ? threads : 1;
#pragma omp parallel for num_threads(team) schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    __m256 values[4];
    __m256 largest = _mm256_setzero_ps();
    for (int q = 0; q < 4; ++q) {
      values[q] = load8(x + i * kBlock + 8 * q);
      // The running maximum second: a NaN lane keeps it, as std::fmax would.
      largest = _mm256_max_ps(_mm256_and_ps(values[q], magnitude), largest);
    }
    __m128 folded = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
    folded = _mm_max_ps(folded, _mm_movehl_ps(folded, folded));
    folded = _mm_max_ss(folded, _mm_shuffle_ps(folded, folded, 1));
    const float scale = _mm_cvtss_f32(folded) / 127.0f;
    scales[i] = scale;
    const __m256 divisor = _mm256_set1_ps(scale > 0.0f ? scale : 1.0f);
    __m256i rounded[4];
    for (int q = 0; q < 4; ++q) rounded[q] = _mm256_cvtps_epi32(_mm256_div_ps(values[q], divisor));
    // |code| <= 127: the saturating packs are exact.
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(rounded[0], rounded[1]),
                                             _mm256_packs_epi32(rounded[2], rounded[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i * kBlock),
                        _mm256_permutevar8x32_epi32(bytes, order));
    const __m256i first = _mm256_add_epi32(rounded[0], rounded[1]);
    const __m256i second = _mm256_add_epi32(rounded[2], rounded[3]);
    const __m256i pairs = _mm256_hadd_epi32(first, second);
    const __m256i quads = _mm256_hadd_epi32(pairs, pairs);
    const __m128i halves =
        _mm_add_epi32(_mm256_castsi256_si128(quads), _mm256_extracti128_si256(quads, 1));
    half_sums[2 * i] = _mm_cvtsi128_si32(halves);
    half_sums[2 * i + 1] = _mm_extract_epi32(halves, 1);
  }
}

// The eight lanes summed pairwise, in one fixed order.
inline float sum8(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// Lanes rounded to the precision of Out (bfloat16: to nearest even, as
// store() rounds; NaNs stay NaN), still as float32: the value an elementwise
// torch operator on Out tensors hands to the next one.
inline __m256 round_to(__m256 v, const float*) { return v; }

inline __m256 round_to(__m256 v, const uint16_t*) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i nearest =
      _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
  const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F800000));
  const __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000));
  const __m256i chosen = _mm256_blendv_epi8(nearest, quiet, nan);
  return _mm256_castsi256_ps(_mm256_and_si256(chosen, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// Eight lanes to out, rounded as store() rounds.
template <typename Out>
inline void store8(__m256 v, Out* out) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  for (int e = 0; e < 8; ++e) store(lanes[e], out + e);
}

// The first ``valid`` of ``lanes`` to out (a tile's last rows may be padding).
template <typename Out>
inline void store_lanes(const float* lanes, Out* out, int valid) {
  for (int i = 0; i < valid; ++i) store(lanes[i], out + i);
}

struct RoundedRows {
  const int8_t* codes;       // [rows, k]
  const float* scales;       // [rows, k / 32]
  const int32_t* half_sums;  // [rows, k / 32, 2]: the sum of each half block's codes
};

// x's rows rounded per block, into this thread's buffers (reused by the
// next call on the same thread).
inline RoundedRows round_rows(const void* x, int x_dtype, int64_t rows, int64_t k, int threads) {
  thread_local std::vector<int8_t> codes;
  thread_local std::vector<float> scales;
  thread_local std::vector<int32_t> half_sums;
  codes.resize(static_cast<size_t>(rows * k));
  scales.resize(static_cast<size_t>(rows * (k / kBlock)));
  half_sums.resize(static_cast<size_t>(rows * (k / kBlock) * 2));
  if (x_dtype == 0)
    quantize(static_cast<const float*>(x), rows, k, codes.data(), scales.data(),
             half_sums.data(), threads);
  else
    quantize(static_cast<const uint16_t*>(x), rows, k, codes.data(), scales.data(),
             half_sums.data(), threads);
  return {codes.data(), scales.data(), half_sums.data()};
}

// run(out as float*) for dtype 0 (float32), run(out as uint16_t*) for 1 (bfloat16).
template <typename Run>
inline int with_dtype(void* out, int dtype, Run&& run) {
  if (dtype == 0) return run(static_cast<float*>(out));
  return run(static_cast<uint16_t*>(out));
}

}  // namespace specray
