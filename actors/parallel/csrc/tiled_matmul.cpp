// The block kernel on AVX512-VNNI, with weights tiled by 16 output rows.
//
// Same values and rounding as block_matmul.cpp (signed codes in groups of 32
// or 16 with one scale each; activations rounded to int8 per block of 32),
// laid out so that one vpdpbusd multiplies 4 input features of 16 output
// rows by the same 4 activation codes: a block of 16 rows x 32 features is 8
// such products, summed in int32 across the 16 lanes with no horizontal
// reduction, then scaled once per block and row of activations. Compared
// with a layout whose lanes are input features, a row of activations costs
// about a third of the instructions, which is what a verify of many rows
// (and a decode's unpacking) pays for.
//
// Layout, per tile t of 16 output rows and block b of 32 input features,
// with u = code - code_min (0 .. 2^bits; 8-bit codes as code + 128), and
// chunk c (c = 0..7) the 64 bytes u[16t + i][32b + 4c + j] at byte 4i + j:
//   bits 4-6: nibbles[t, b, 4, 64]: byte = chunk c | chunk (c + 4) << 4
//             planes[t, b, bits - 4, 8]: u64 whose bit j is bit (4 + plane)
//             of byte j of chunk c
//   bits 8:   codes[t, b, 8, 64]: the chunks themselves
//   scales[t, b, 32 / group, 16]: float32 or fp16, rows of the tile last
//   offsets[t, b, 32 / group, 16]: as the scales, or none (value = scale *
//             code + offset: Q4_K / Q5_K / Q4_1 / Q5_1, whose codes start at 0)
// Output rows past n_out (the last tile's padding) are not written.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "block_common.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

namespace {

using specray::kBlock;
using specray::store;

constexpr int kTileRows = 16;
constexpr int kChunks = kBlock / 4;
constexpr int kRowTile = 4;  // activation rows that share one unpacked block

struct Tiles {
  const uint8_t* nibbles;
  const uint64_t* planes;
  const uint8_t* codes;
  const void* scales;
  const void* offsets;  // nullptr: none; in the scales' type
  int bits;
  int group;
  int code_min;
  int fp16_scales;
};

struct Rounded {
  const int8_t* codes;     // [rows, k]
  const float* scales;     // [rows, k / 32]
  const int32_t* offsets;  // [rows, k / 32, 2]: code_min * sum of each half's codes
  const float* sums;       // [rows, k / 32, 2]: scale * sum of each half's codes
};

// The 8 chunks of unsigned codes of block (t, b).
template <int Bits>
inline void unpack(const Tiles& w, int64_t tile_block, __m512i* chunks) {
  if constexpr (Bits == 8) {
    const uint8_t* codes = w.codes + tile_block * kChunks * 64;
    for (int c = 0; c < kChunks; ++c)
      chunks[c] = _mm512_loadu_si512(reinterpret_cast<const void*>(codes + c * 64));
  } else {
    const uint8_t* nibbles = w.nibbles + tile_block * 4 * 64;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
      const __m512i packed = _mm512_loadu_si512(reinterpret_cast<const void*>(nibbles + c * 64));
      chunks[c] = _mm512_and_si512(packed, low4);
      chunks[c + 4] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
    }
    const uint64_t* planes = w.planes + tile_block * (Bits - 4) * kChunks;
    for (int plane = 0; plane < Bits - 4; ++plane) {
      const __m512i bit = _mm512_set1_epi8(static_cast<char>(16 << plane));
      for (int c = 0; c < kChunks; ++c) {
        const __mmask64 set = planes[plane * kChunks + c];
        chunks[c] = _mm512_or_si512(chunks[c], _mm512_maskz_mov_epi8(set, bit));
      }
    }
  }
}

// The 16 rows' scales of group g of block (t, b).
inline __m512 tile_scales(const Tiles& w, int64_t tile_block, int groups, int g) {
  const int64_t at = (tile_block * groups + g) * kTileRows;
  if (w.fp16_scales) {
    const __m256i half =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w.scales) + at));
    return _mm512_cvtph_ps(half);
  }
  return _mm512_loadu_ps(static_cast<const float*>(w.scales) + at);
}

inline __m512 tile_offsets(const Tiles& w, int64_t tile_block, int groups, int g) {
  const int64_t at = (tile_block * groups + g) * kTileRows;
  if (w.fp16_scales) {
    const __m256i half = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w.offsets) + at));
    return _mm512_cvtph_ps(half);
  }
  return _mm512_loadu_ps(static_cast<const float*>(w.offsets) + at);
}

template <typename Out>
inline void store_tile(__m512 values, Out* out, int valid) {
  alignas(64) float lanes[kTileRows];
  _mm512_store_ps(lanes, values);
  for (int i = 0; i < valid; ++i) store(lanes[i], out + i);
}

// Output rows of tile t for activation rows [m0, m0 + Rows).
template <int Bits, int Group, int Rows, typename Out>
inline void tile_rows(const Tiles& w, const Rounded& a, int64_t k, int64_t tile, int64_t m0,
                      int64_t n_out, Out* y) {
  const int64_t blocks = k / kBlock;
  constexpr int kGroups = kBlock / Group;
  __m512 acc[Rows];
  for (int r = 0; r < Rows; ++r) acc[r] = _mm512_setzero_ps();
  __m512i chunks[kChunks];
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t tile_block = tile * blocks + b;
    unpack<Bits>(w, tile_block, chunks);
    const __m512 first_scales = tile_scales(w, tile_block, kGroups, 0);
    const __m512 second_scales = kGroups == 2 ? tile_scales(w, tile_block, kGroups, 1) : first_scales;
    const bool offset = w.offsets != nullptr;
    const __m512 zero = _mm512_setzero_ps();
    const __m512 first_offsets = offset ? tile_offsets(w, tile_block, kGroups, 0) : zero;
    const __m512 second_offsets =
        offset && kGroups == 2 ? tile_offsets(w, tile_block, kGroups, 1) : first_offsets;
    for (int r = 0; r < Rows; ++r) {
      const int64_t row = m0 + r;
      const int32_t* x4 = reinterpret_cast<const int32_t*>(a.codes + row * k + b * kBlock);
      const int32_t* offsets = a.offsets + (row * blocks + b) * 2;
      const __m512 x_scale = _mm512_set1_ps(a.scales[row * blocks + b]);
      // sum over a group of (u + code_min) * x, exact in int32: the offsets
      // (code_min * sum x) start each group's sum.
      // Four independent chains of two products each (a chain of eight
      // dependent vpdpbusd is what one row would otherwise wait on); the
      // integer sums are exact in any order.
      __m512i quarter[4];
      for (int q = 0; q < 4; ++q) {
        const int low = q < 2 ? q : q + 2;  // chunks 0, 1, 4, 5 start the chains
        quarter[q] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), chunks[low],
                                         _mm512_set1_epi32(x4[low]));
        quarter[q] = _mm512_dpbusd_epi32(quarter[q], chunks[low + 2],
                                         _mm512_set1_epi32(x4[low + 2]));
      }
      // Chunks 0-3 are the block's first 16 features, 4-7 its last 16.
      const __m512i first_half = _mm512_add_epi32(_mm512_add_epi32(quarter[0], quarter[1]),
                                                  _mm512_set1_epi32(offsets[0]));
      const __m512i second_half = _mm512_add_epi32(_mm512_add_epi32(quarter[2], quarter[3]),
                                                   _mm512_set1_epi32(offsets[1]));
      if constexpr (kGroups == 1) {
        const __m512i sums = _mm512_add_epi32(first_half, second_half);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(first_scales, x_scale),
                                 acc[r]);
        if (offset) {
          const float* x_sums = a.sums + (row * blocks + b) * 2;
          acc[r] = _mm512_fmadd_ps(first_offsets, _mm512_set1_ps(x_sums[0] + x_sums[1]), acc[r]);
        }
      } else {
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(first_half),
                                 _mm512_mul_ps(first_scales, x_scale), acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(second_half),
                                 _mm512_mul_ps(second_scales, x_scale), acc[r]);
        if (offset) {
          const float* x_sums = a.sums + (row * blocks + b) * 2;
          acc[r] = _mm512_fmadd_ps(first_offsets, _mm512_set1_ps(x_sums[0]), acc[r]);
          acc[r] = _mm512_fmadd_ps(second_offsets, _mm512_set1_ps(x_sums[1]), acc[r]);
        }
      }
    }
  }
  const int64_t n0 = tile * kTileRows;
  const int valid = static_cast<int>(n_out - n0 < kTileRows ? n_out - n0 : kTileRows);
  for (int r = 0; r < Rows; ++r) store_tile(acc[r], y + (m0 + r) * n_out + n0, valid);
}

template <int Bits, int Group, typename Out>
void tiled(const Tiles& w, const Rounded& a, int64_t rows, int64_t k, int64_t n_out, Out* y,
           int threads) {
  const int64_t tiles = (n_out + kTileRows - 1) / kTileRows;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    int64_t m0 = 0;
    for (; m0 + kRowTile <= rows; m0 += kRowTile)
      tile_rows<Bits, Group, kRowTile>(w, a, k, tile, m0, n_out, y);
    switch (rows - m0) {
      case 3: tile_rows<Bits, Group, 3>(w, a, k, tile, m0, n_out, y); break;
      case 2: tile_rows<Bits, Group, 2>(w, a, k, tile, m0, n_out, y); break;
      case 1: tile_rows<Bits, Group, 1>(w, a, k, tile, m0, n_out, y); break;
      default: break;
    }
  }
}

template <int Group, typename Out>
int tiled_bits(const Tiles& w, const Rounded& a, int64_t rows, int64_t k, int64_t n_out, Out* y,
               int threads) {
  switch (w.bits) {
    case 4: tiled<4, Group>(w, a, rows, k, n_out, y, threads); return 0;
    case 5: tiled<5, Group>(w, a, rows, k, n_out, y, threads); return 0;
    case 6: tiled<6, Group>(w, a, rows, k, n_out, y, threads); return 0;
    case 8: tiled<8, Group>(w, a, rows, k, n_out, y, threads); return 0;
    default: return 1;
  }
}

// Output rows [first, last) of the weight, dense.
template <int Bits, typename Out>
void dequantize_tiles(const Tiles& w, int64_t k, int64_t first, int64_t last, Out* out,
                      int threads) {
  const int64_t blocks = k / kBlock;
  const int groups = kBlock / w.group;
  const int64_t first_tile = first / kTileRows;
  const int64_t end_tile = (last + kTileRows - 1) / kTileRows;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t tile = first_tile; tile < end_tile; ++tile) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t tile_block = tile * blocks + b;
      __m512i chunks[kChunks];
      unpack<Bits>(w, tile_block, chunks);
      alignas(64) uint8_t bytes[kChunks][64];
      for (int c = 0; c < kChunks; ++c)
        _mm512_store_si512(reinterpret_cast<void*>(bytes[c]), chunks[c]);
      alignas(64) float scales[2][kTileRows];
      alignas(64) float offsets[2][kTileRows] = {};
      for (int g = 0; g < groups; ++g) {
        _mm512_store_ps(scales[g], tile_scales(w, tile_block, groups, g));
        if (w.offsets != nullptr) _mm512_store_ps(offsets[g], tile_offsets(w, tile_block, groups, g));
      }
      for (int i = 0; i < kTileRows; ++i) {
        const int64_t n = tile * kTileRows + i;
        if (n < first || n >= last) continue;
        Out* row = out + (n - first) * k + b * kBlock;
        for (int c = 0; c < kChunks; ++c) {
          const int g = (c * 4) / w.group;
          for (int j = 0; j < 4; ++j) {
            const int code = static_cast<int>(bytes[c][4 * i + j]) + w.code_min;
            // Two roundings, as the checkpoint's own dequantizer computes it.
            const float scaled = scales[g][i] * static_cast<float>(code);
            store(w.offsets != nullptr ? scaled + offsets[g][i] : scaled, row + 4 * c + j);
          }
        }
      }
    }
  }
}

template <typename Out>
int dequantize_bits(const Tiles& w, int64_t k, int64_t first, int64_t last, Out* out,
                    int threads) {
  switch (w.bits) {
    case 4: dequantize_tiles<4>(w, k, first, last, out, threads); return 0;
    case 5: dequantize_tiles<5>(w, k, first, last, out, threads); return 0;
    case 6: dequantize_tiles<6>(w, k, first, last, out, threads); return 0;
    case 8: dequantize_tiles<8>(w, k, first, last, out, threads); return 0;
    default: return 1;
  }
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for a format it does not know.
// x_dtype / y_dtype: 0 float32, 1 bfloat16; code_min is -128 for 8-bit codes.
int specray_tiled_matmul(const void* x, int x_dtype, int64_t rows, int64_t k,
                         const uint8_t* nibbles, const uint64_t* planes, const uint8_t* codes,
                         const void* scales, int fp16_scales, const void* weight_offsets,
                         int bits, int group, int code_min, int64_t n_out, void* y, int y_dtype,
                         int threads) {
  if (k % kBlock || (group != 32 && group != 16)) return 1;
  const specray::RoundedRows rounded = specray::round_rows(x, x_dtype, rows, k);
  const int8_t* x_codes = rounded.codes;
  thread_local std::vector<int32_t> offsets;
  thread_local std::vector<float> sums;
  const int64_t blocks = k / kBlock;
  offsets.resize(static_cast<size_t>(rows * blocks * 2));
  sums.resize(static_cast<size_t>(rows * blocks * 2));
  for (int64_t i = 0; i < rows * blocks; ++i) {
    for (int half = 0; half < 2; ++half) {
      int32_t sum = 0;
      for (int j = 0; j < kBlock / 2; ++j) sum += x_codes[i * kBlock + half * (kBlock / 2) + j];
      offsets[i * 2 + half] = code_min * sum;
      sums[i * 2 + half] = rounded.scales[i] * static_cast<float>(sum);
    }
  }
  const Tiles w{nibbles, planes, codes, scales, weight_offsets, bits, group, code_min, fp16_scales};
  const Rounded a{rounded.codes, rounded.scales, offsets.data(), sums.data()};
  return specray::with_dtype(y, y_dtype, [&](auto* out) {
    return group == 32 ? tiled_bits<32>(w, a, rows, k, n_out, out, threads)
                       : tiled_bits<16>(w, a, rows, k, n_out, out, threads);
  });
}

int specray_tiled_dequantize(const uint8_t* nibbles, const uint64_t* planes, const uint8_t* codes,
                             const void* scales, int fp16_scales, const void* weight_offsets,
                             int bits, int group, int code_min, int64_t k, int64_t first,
                             int64_t last, void* out, int out_dtype, int threads) {
  if (k % kBlock || (group != 32 && group != 16)) return 1;
  const Tiles w{nibbles, planes, codes, scales, weight_offsets, bits, group, code_min, fp16_scales};
  return specray::with_dtype(out, out_dtype, [&](auto* dense) {
    return dequantize_bits(w, k, first, last, dense, threads);
  });
}

}  // extern "C"

#endif
