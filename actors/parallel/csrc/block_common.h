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

template <typename In>
inline float load_value(const In* x, int64_t i);
template <>
inline float load_value(const float* x, int64_t i) { return x[i]; }
template <>
inline float load_value(const uint16_t* x, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(x[i]) << 16;
  float value;
  memcpy(&value, &bits, sizeof value);
  return value;
}

// Each 32-value block of each row to int8 on the scale max|x| / 127, rounded
// half to even (torch.round); an all-zero block keeps scale 0.
template <typename In>
void quantize(const In* x, int64_t rows, int64_t k, int8_t* codes, float* scales) {
  const int64_t blocks = k / kBlock;
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t start = row * k + b * kBlock;
      float values[kBlock];
      float largest = 0.0f;
      for (int j = 0; j < kBlock; ++j) {
        values[j] = load_value(x, start + j);
        largest = std::fmax(largest, std::fabs(values[j]));
      }
      const float scale = largest / 127.0f;
      scales[row * blocks + b] = scale;
      const float divisor = scale > 0.0f ? scale : 1.0f;
      for (int j = 0; j < kBlock; ++j)
        codes[start + j] = static_cast<int8_t>(std::nearbyint(values[j] / divisor));
    }
  }
}

// Eight values widened to float32 lanes.
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }

inline __m256 load8(const uint16_t* x) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
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
  const int8_t* codes;  // [rows, k]
  const float* scales;  // [rows, k / 32]
};

// x's rows rounded per block, into this thread's buffers (reused by the
// next call on the same thread).
inline RoundedRows round_rows(const void* x, int x_dtype, int64_t rows, int64_t k) {
  thread_local std::vector<int8_t> codes;
  thread_local std::vector<float> scales;
  codes.resize(static_cast<size_t>(rows * k));
  scales.resize(static_cast<size_t>(rows * (k / kBlock)));
  if (x_dtype == 0)
    quantize(static_cast<const float*>(x), rows, k, codes.data(), scales.data());
  else
    quantize(static_cast<const uint16_t*>(x), rows, k, codes.data(), scales.data());
  return {codes.data(), scales.data()};
}

// run(out as float*) for dtype 0 (float32), run(out as uint16_t*) for 1 (bfloat16).
template <typename Run>
inline int with_dtype(void* out, int dtype, Run&& run) {
  if (dtype == 0) return run(static_cast<float*>(out));
  return run(static_cast<uint16_t*>(out));
}

}  // namespace specray
