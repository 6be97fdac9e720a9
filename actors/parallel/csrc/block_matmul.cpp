// Matmuls on GGUF-style quantized blocks, read as stored: 4, 5, 6 or 8 bit
// signed codes in groups of 32 or 16 input features with one scale each.
//
// y[m, n] = sum_k x[m, k] * scale[n, k / group] * code[n, k]
//
// Each 32-value block of an activation row is rounded to int8 on its own
// scale (its largest magnitude becomes 127), the integer products of a block
// are summed exactly in int32, and the block's float sum is
// (weight scale * activation scale) * integer sum, accumulated in float32.
// A row's result depends on that row alone, in the same order of operations
// whatever the number of rows, so a k-row verify equals k one-row decodes.
//
// Weight layout (repacked at load time by block_weights.py), per output row n
// and block b of 32 input features, with u = code - code_min (0 .. 2^bits):
//   bits 4-6: nibbles[n, b, 16]: byte j holds u[j] & 15 | (u[j + 16] & 15) << 4
//             planes[n, b, bits - 4]: u32 whose bit j is bit (4 + plane) of u[j]
//   bits 8:   codes[n, b, 32] int8, the codes themselves
//   scales[n, b, 32 / group]: float32 or fp16
//
// Needs AVX2, FMA and F16C. Threads: OpenMP, the runtime torch itself uses.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "block_common.h"

namespace {

using specray::kBlock;
using specray::store;

constexpr int kTile = 4;  // activation rows that share one unpacked weight block

struct Weights {
  const uint8_t* nibbles;
  const uint32_t* planes;
  const int8_t* codes;
  const void* scales;
  int bits;
  int group;
  int code_min;
  int fp16_scales;
};

struct Activations {
  const int8_t* codes;  // [rows, k]
  const float* scales;  // [rows, k / 32]
};

inline float scale_at(const Weights& w, int64_t index) {
  if (w.fp16_scales) return _cvtsh_ss(static_cast<const uint16_t*>(w.scales)[index]);
  return static_cast<const float*>(w.scales)[index];
}

// 0xFF in byte j where bit j of mask is set.
inline __m256i bytes_of_bits(uint32_t mask) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2,
                                          2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i select = _mm256_set1_epi64x(0x8040201008040201LL);
  __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(mask)), spread);
  return _mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select);
}

// The 32 signed codes of block (n, b).
template <int Bits>
inline __m256i load_codes(const Weights& w, int64_t block) {
  if constexpr (Bits == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + block * kBlock));
  } else {
    const __m128i packed =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.nibbles + block * (kBlock / 2)));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low4),
                                 _mm_and_si128(packed, low4));
    for (int plane = 0; plane < Bits - 4; ++plane) {
      const __m256i set = bytes_of_bits(w.planes[block * (Bits - 4) + plane]);
      u = _mm256_or_si256(u, _mm256_and_si256(set, _mm256_set1_epi8(static_cast<char>(16 << plane))));
    }
    return _mm256_add_epi8(u, _mm256_set1_epi8(static_cast<char>(w.code_min)));
  }
}

inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// Rows [m0, m0 + Rows) of y for output feature n.
template <int Bits, int Group, int Rows, typename Out>
inline void dot_rows(const Weights& w, const Activations& a, int64_t k, int64_t n, int64_t m0,
                     Out* y, int64_t ldy) {
  const int64_t blocks = k / kBlock;
  constexpr int kGroups = kBlock / Group;
  __m256 acc[Rows];
  for (int r = 0; r < Rows; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t block = n * blocks + b;
    const __m256i codes = load_codes<Bits>(w, block);
    const __m256i magnitudes = _mm256_sign_epi8(codes, codes);
    __m256 weight_scale;
    if constexpr (kGroups == 1) {
      weight_scale = _mm256_set1_ps(scale_at(w, block));
    } else {
      weight_scale = _mm256_set_m128(_mm_set1_ps(scale_at(w, block * 2 + 1)),
                                     _mm_set1_ps(scale_at(w, block * 2)));
    }
    for (int r = 0; r < Rows; ++r) {
      const int64_t row = m0 + r;
      const __m256i x = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(a.codes + row * k + b * kBlock));
      // |code| * (x signed like code): the products, exact in int16 pairs
      // (at most 2 * 128 * 127) and int32 quads.
      const __m256i pairs = _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(x, codes));
      const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
      const __m256 scale = _mm256_mul_ps(weight_scale, _mm256_set1_ps(a.scales[row * blocks + b]));
      acc[r] = _mm256_fmadd_ps(sums, scale, acc[r]);
    }
  }
  for (int r = 0; r < Rows; ++r) store(horizontal_sum(acc[r]), y + (m0 + r) * ldy + n);
}


template <int Bits, int Group, typename Out>
void matmul(const Weights& w, const Activations& a, int64_t rows, int64_t k, int64_t n_out, Out* y,
            int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < n_out; ++n) {
    int64_t m0 = 0;
    for (; m0 + kTile <= rows; m0 += kTile) dot_rows<Bits, Group, kTile>(w, a, k, n, m0, y, n_out);
    switch (rows - m0) {
      case 3: dot_rows<Bits, Group, 3>(w, a, k, n, m0, y, n_out); break;
      case 2: dot_rows<Bits, Group, 2>(w, a, k, n, m0, y, n_out); break;
      case 1: dot_rows<Bits, Group, 1>(w, a, k, n, m0, y, n_out); break;
      default: break;
    }
  }
}

template <int Group, typename Out>
int dispatch_bits(const Weights& w, const Activations& a, int64_t rows, int64_t k, int64_t n_out,
                  Out* y, int threads) {
  switch (w.bits) {
    case 4: matmul<4, Group>(w, a, rows, k, n_out, y, threads); return 0;
    case 5: matmul<5, Group>(w, a, rows, k, n_out, y, threads); return 0;
    case 6: matmul<6, Group>(w, a, rows, k, n_out, y, threads); return 0;
    case 8: matmul<8, Group>(w, a, rows, k, n_out, y, threads); return 0;
    default: return 1;
  }
}

// Rows [first, last) of the weight as float32 or bfloat16, [last - first, k].
template <int Bits, int Group, typename Out>
void dequantize(const Weights& w, int64_t k, int64_t first, int64_t last, Out* out, int threads) {
  const int64_t blocks = k / kBlock;
  constexpr int kGroups = kBlock / Group;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = first; n < last; ++n) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t block = n * blocks + b;
      alignas(32) int8_t codes[kBlock];
      _mm256_store_si256(reinterpret_cast<__m256i*>(codes), load_codes<Bits>(w, block));
      Out* row = out + (n - first) * k + b * kBlock;
      for (int j = 0; j < kBlock; ++j) {
        const float scale = scale_at(w, block * kGroups + j / Group);
        store(scale * static_cast<float>(codes[j]), row + j);
      }
    }
  }
}

template <int Group, typename Out>
int dequantize_bits(const Weights& w, int64_t k, int64_t first, int64_t last, Out* out,
                    int threads) {
  switch (w.bits) {
    case 4: dequantize<4, Group>(w, k, first, last, out, threads); return 0;
    case 5: dequantize<5, Group>(w, k, first, last, out, threads); return 0;
    case 6: dequantize<6, Group>(w, k, first, last, out, threads); return 0;
    case 8: dequantize<8, Group>(w, k, first, last, out, threads); return 0;
    default: return 1;
  }
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for a format this file does not know.
// x_dtype / y_dtype: 0 float32, 1 bfloat16.
int specray_block_matmul(const void* x, int x_dtype, int64_t rows, int64_t k,
                         const uint8_t* nibbles, const uint32_t* planes, const int8_t* codes,
                         const void* scales, int fp16_scales, int bits, int group, int code_min,
                         int64_t n_out, void* y, int y_dtype, int threads) {
  if (k % kBlock || (group != 32 && group != 16)) return 1;
  const specray::RoundedRows rounded = specray::round_rows(x, x_dtype, rows, k);
  const Weights w{nibbles, planes, codes, scales, bits, group, code_min, fp16_scales};
  const Activations a{rounded.codes, rounded.scales};
  return specray::with_dtype(y, y_dtype, [&](auto* out) {
    return group == 32 ? dispatch_bits<32>(w, a, rows, k, n_out, out, threads)
                       : dispatch_bits<16>(w, a, rows, k, n_out, out, threads);
  });
}

// The weight's rows [first, last) dequantized into out ([last - first, k],
// float32 or bfloat16 as out_dtype says), for matmuls with many rows.
int specray_block_dequantize(const uint8_t* nibbles, const uint32_t* planes, const int8_t* codes,
                             const void* scales, int fp16_scales, int bits, int group,
                             int code_min, int64_t k, int64_t first, int64_t last, void* out,
                             int out_dtype, int threads) {
  if (k % kBlock || (group != 32 && group != 16)) return 1;
  const Weights w{nibbles, planes, codes, scales, bits, group, code_min, fp16_scales};
  return specray::with_dtype(out, out_dtype, [&](auto* dense) {
    return group == 32 ? dequantize_bits<32>(w, k, first, last, dense, threads)
                       : dequantize_bits<16>(w, k, first, last, dense, threads);
  });
}

}  // extern "C"
