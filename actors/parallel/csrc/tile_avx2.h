// The block kernel's inner loop on AVX2: a tile's 16 rows as two halves of
// 8, each 4-feature chunk multiplied by vpmaddubsw (unsigned codes times
// signed activations, pairs summed in int16: at most 2 * 63 * 127, so no
// saturation for codes of up to 6 bits; 8-bit codes go signed, |code| times
// the activation signed like the code, at most 2 * 128 * 127) and vpmaddwd
// (quads in int32). Included by tiled_matmul.cpp, which defines Tiles,
// Rounded and the layout.
#pragma once

// Activation rows that share one unpacked block. A half's eight rows of
// accumulators, its scales and a row's partial sums overrun the 16 vector
// registers a little, but unpacking (the 6-bit codes' bit planes above all)
// is paid once per eight rows instead of four: a 9-row verify unpacks each
// block twice, not three times.
constexpr int kRowTile = 8;

// Rows 0-7 and 8-15 of one chunk: 4 bytes per row.
struct Chunk {
  __m256i low;
  __m256i high;
};

// 0xFF in byte j where bit j of mask is set.
inline __m256i bytes_of_bits(uint32_t mask) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2,
                                          2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i select = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(mask)), spread);
  return _mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select);
}

// The 8 chunks of unsigned codes of block (t, b).
template <int Bits>
inline void unpack(const Tiles& w, int64_t tile_block, Chunk* chunks) {
  if constexpr (Bits == 8) {
    const uint8_t* codes = w.codes + tile_block * kChunks * 64;
    for (int c = 0; c < kChunks; ++c) {
      chunks[c].low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c * 64));
      chunks[c].high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c * 64 + 32));
    }
  } else {
    const uint8_t* nibbles = w.nibbles + tile_block * 4 * 64;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
      const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nibbles + c * 64));
      const __m256i high =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nibbles + c * 64 + 32));
      chunks[c] = {_mm256_and_si256(low, low4), _mm256_and_si256(high, low4)};
      chunks[c + 4] = {_mm256_and_si256(_mm256_srli_epi16(low, 4), low4),
                       _mm256_and_si256(_mm256_srli_epi16(high, 4), low4)};
    }
    const uint64_t* planes = w.planes + tile_block * (Bits - 4) * kChunks;
    for (int plane = 0; plane < Bits - 4; ++plane) {
      const __m256i bit = _mm256_set1_epi8(static_cast<char>(16 << plane));
      for (int c = 0; c < kChunks; ++c) {
        const uint64_t set = planes[plane * kChunks + c];
        chunks[c].low = _mm256_or_si256(
            chunks[c].low, _mm256_and_si256(bytes_of_bits(static_cast<uint32_t>(set)), bit));
        chunks[c].high = _mm256_or_si256(
            chunks[c].high, _mm256_and_si256(bytes_of_bits(static_cast<uint32_t>(set >> 32)), bit));
      }
    }
  }
}

// Rows 0-7 (half 0) or 8-15 (half 1) of a per-row value of group g of block (t, b).
inline __m256 tile_values(const void* values, int fp16, int64_t tile_block, int groups, int g,
                          int half) {
  const int64_t at = (tile_block * groups + g) * kTileRows + half * 8;
  if (fp16) {
    const __m128i packed =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + at));
    return _mm256_cvtph_ps(packed);
  }
  return _mm256_loadu_ps(static_cast<const float*>(values) + at);
}

// 8 rows' sums of one chunk's 4 products.
template <int Bits>
inline __m256i chunk_sums(__m256i codes, __m256i x) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (Bits == 8) {
    const __m256i signed_codes = _mm256_xor_si256(codes, _mm256_set1_epi8(static_cast<char>(0x80)));
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(signed_codes, signed_codes),
                                               _mm256_sign_epi8(x, signed_codes));
    return _mm256_madd_epi16(pairs, ones);
  } else {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), ones);
  }
}

// Output rows of tile t for activation rows [m0, m0 + Rows).
template <int Bits, int Group, int Rows, typename Out>
inline void tile_rows(const Tiles& w, const Rounded& a, int64_t k, int64_t tile, int64_t m0,
                      int64_t n_out, Out* y) {
  const int64_t blocks = k / kBlock;
  constexpr int kGroups = kBlock / Group;
  __m256 acc[Rows][2];
  for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  Chunk chunks[kChunks];
  const bool offset = w.offsets != nullptr;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t tile_block = tile * blocks + b;
    unpack<Bits>(w, tile_block, chunks);
    for (int half = 0; half < 2; ++half) {
      const __m256 first_scales = tile_values(w.scales, w.fp16_scales, tile_block, kGroups, 0, half);
      const __m256 second_scales =
          kGroups == 2 ? tile_values(w.scales, w.fp16_scales, tile_block, kGroups, 1, half)
                       : first_scales;
      const __m256 zero = _mm256_setzero_ps();
      const __m256 first_offsets =
          offset ? tile_values(w.offsets, w.fp16_scales, tile_block, kGroups, 0, half) : zero;
      const __m256 second_offsets =
          offset && kGroups == 2
              ? tile_values(w.offsets, w.fp16_scales, tile_block, kGroups, 1, half)
              : first_offsets;
      for (int r = 0; r < Rows; ++r) {
        const int64_t row = m0 + r;
        const int32_t* x4 = reinterpret_cast<const int32_t*>(a.codes + row * k + b * kBlock);
        const int32_t* offsets = a.offsets + (row * blocks + b) * 2;
        __m256i quarter[4];
        for (int q = 0; q < 4; ++q) {
          const int low = q < 2 ? q : q + 2;  // chunks 0, 1, 4, 5 start the chains
          const __m256i* part = half == 0 ? &chunks[low].low : &chunks[low].high;
          const __m256i* next = half == 0 ? &chunks[low + 2].low : &chunks[low + 2].high;
          quarter[q] = _mm256_add_epi32(chunk_sums<Bits>(*part, _mm256_set1_epi32(x4[low])),
                                        chunk_sums<Bits>(*next, _mm256_set1_epi32(x4[low + 2])));
        }
        __m256i first_half = _mm256_add_epi32(quarter[0], quarter[1]);
        __m256i second_half = _mm256_add_epi32(quarter[2], quarter[3]);
        if constexpr (Bits < 8) {  // 8-bit codes were multiplied signed: nothing to add back
          first_half = _mm256_add_epi32(first_half, _mm256_set1_epi32(offsets[0]));
          second_half = _mm256_add_epi32(second_half, _mm256_set1_epi32(offsets[1]));
        }
        const __m256 x_scale = _mm256_set1_ps(a.scales[row * blocks + b]);
        __m256& out = acc[r][half];
        const float* x_sums = a.sums + (row * blocks + b) * 2;
        if constexpr (kGroups == 1) {
          const __m256i sums = _mm256_add_epi32(first_half, second_half);
          out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(first_scales, x_scale), out);
          if (offset) out = _mm256_fmadd_ps(first_offsets, _mm256_set1_ps(x_sums[0] + x_sums[1]), out);
        } else {
          out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(first_half),
                                _mm256_mul_ps(first_scales, x_scale), out);
          out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(second_half),
                                _mm256_mul_ps(second_scales, x_scale), out);
          if (offset) {
            out = _mm256_fmadd_ps(first_offsets, _mm256_set1_ps(x_sums[0]), out);
            out = _mm256_fmadd_ps(second_offsets, _mm256_set1_ps(x_sums[1]), out);
          }
        }
      }
    }
  }
  const int64_t n0 = tile * kTileRows;
  const int valid = static_cast<int>(n_out - n0 < kTileRows ? n_out - n0 : kTileRows);
  for (int r = 0; r < Rows; ++r) {
    alignas(32) float lanes[kTileRows];
    _mm256_store_ps(lanes, acc[r][0]);
    _mm256_store_ps(lanes + 8, acc[r][1]);
    specray::store_lanes(lanes, y + (m0 + r) * n_out + n0, valid);
  }
}
