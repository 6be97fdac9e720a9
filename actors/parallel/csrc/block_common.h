// What both block kernels share: the activation rounding and the output
// stores.
#pragma once

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
