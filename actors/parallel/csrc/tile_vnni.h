// The block kernel's inner loop on AVX512-VNNI: one vpdpbusd multiplies 4
// input features of all 16 rows of a tile by the same 4 activation codes.
// Included by tiled_matmul.cpp, which defines Tiles, Rounded and the layout.
#pragma once

// Activation rows that share one unpacked block: eight rows' accumulators,
// the block's eight chunks, its scales and a row's two partial sums fit in
// the 32 vector registers.
constexpr int kRowTile = 8;

#include "tile_unpack.h"

// The 8 chunks of unsigned codes of block (t, b), all 16 rows.
template <int Bits>
inline void unpack(const Tiles& w, int64_t tile_block, __m512i* chunks) {
  unpack_codes<64, Bits>(w, tile_block, 0, chunks);
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
    const bool shifted = w.code_min != 0;
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
      // (code_min * sum x) start each group's sum. The integer sums are
      // exact in any order, so how they are chained is free: with few rows,
      // four independent chains of two products (a chain of eight dependent
      // vpdpbusd is what one row would otherwise wait on); with four rows
      // or more the rows' chains hide each other's latency, and one chain
      // per half saves the adds.
      __m512i first_half = shifted ? _mm512_set1_epi32(offsets[0]) : _mm512_setzero_si512();
      __m512i second_half = shifted ? _mm512_set1_epi32(offsets[1]) : _mm512_setzero_si512();
      if constexpr (Rows >= 4) {
        for (int c = 0; c < 4; ++c) {  // chunks 0-3: the block's first 16 features
          first_half = _mm512_dpbusd_epi32(first_half, chunks[c], _mm512_set1_epi32(x4[c]));
          second_half =
              _mm512_dpbusd_epi32(second_half, chunks[c + 4], _mm512_set1_epi32(x4[c + 4]));
        }
      } else {
        __m512i quarter[4];
        for (int q = 0; q < 4; ++q) {
          const int low = q < 2 ? q : q + 2;  // chunks 0, 1, 4, 5 start the chains
          quarter[q] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), chunks[low],
                                           _mm512_set1_epi32(x4[low]));
          quarter[q] = _mm512_dpbusd_epi32(quarter[q], chunks[low + 2],
                                           _mm512_set1_epi32(x4[low + 2]));
        }
        first_half = _mm512_add_epi32(first_half, _mm512_add_epi32(quarter[0], quarter[1]));
        second_half = _mm512_add_epi32(second_half, _mm512_add_epi32(quarter[2], quarter[3]));
      }
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
  for (int r = 0; r < Rows; ++r) {
    alignas(64) float lanes[kTileRows];
    _mm512_store_ps(lanes, acc[r]);
    specray::store_lanes(lanes, y + (m0 + r) * n_out + n0, valid);
  }
}

