// The block kernel's inner loop on AVX2: a tile's 16 rows as two halves of
// 8, each 4-feature chunk multiplied by vpmaddubsw (unsigned codes times
// signed activations, pairs summed in int16: at most 2 * 63 * 127, so no
// saturation for codes of up to 6 bits; 8-bit codes go signed, |code| times
// the activation signed like the code, at most 2 * 128 * 127), pair sums of
// several chunks added in int16 where they cannot overflow, then vpmaddwd
// (quads in int32). One half of a tile's rows at a time, block after block,
// so its accumulators stay in registers. Included by tiled_matmul.cpp,
// which defines Tiles, Rounded and the layout.
#pragma once

// Activation rows that share one unpacked block. A half's eight rows of
// accumulators and its eight chunks of codes fill the 16 vector registers,
// but unpacking is paid once per eight rows instead of four: a 9-row verify
// unpacks each block twice, not three times.
constexpr int kRowTile = 8;

#include "tile_unpack.h"

// The 8 chunks of unsigned codes of block (t, b), rows 0-7 (half 0) or 8-15 (half 1).
template <int Bits>
inline void unpack_half(const Tiles& w, int64_t tile_block, int half, __m256i* codes) {
  unpack_codes<32, Bits>(w, tile_block, half * 32, codes);
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

// 8 rows' int16 pair sums of one chunk's 4 products (vpmaddubsw).
template <int Bits>
inline __m256i chunk_pairs(__m256i codes, __m256i x) {
  if constexpr (Bits == 8) {
    const __m256i signed_codes = _mm256_xor_si256(codes, _mm256_set1_epi8(static_cast<char>(0x80)));
    return _mm256_maddubs_epi16(_mm256_sign_epi8(signed_codes, signed_codes),
                                _mm256_sign_epi8(x, signed_codes));
  } else {
    return _mm256_maddubs_epi16(codes, x);
  }
}

// Chunks whose pair sums add up in int16 before vpmaddwd widens them: a
// pair sum is at most 2 * (2^Bits - 1) * 127, so 8 of 4-bit codes (30480),
// 4 of 5-bit (31496), 2 of 6-bit (32004), 1 of 8-bit. Integer sums are
// exact in any order: the result is bit for bit what one vpmaddwd per
// chunk gave, for half the widening multiplies or fewer.
template <int Bits>
constexpr int kChunksPerWiden = Bits == 4 ? 8 : Bits == 5 ? 4 : Bits == 6 ? 2 : 1;

// 8 rows' int32 sums of chunks [first, first + Count) of one half: each
// chunk c times activation codes x4[c].
template <int Bits, int Count>
inline __m256i chunk_sums(const __m256i* codes, const int32_t* x4, int first) {
  constexpr int kRun = kChunksPerWiden<Bits> < Count ? kChunksPerWiden<Bits> : Count;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i total = _mm256_setzero_si256();
  for (int run = first; run < first + Count; run += kRun) {
    __m256i pairs = _mm256_setzero_si256();
    for (int c = run; c < run + kRun; ++c) {
      pairs = _mm256_add_epi16(pairs, chunk_pairs<Bits>(codes[c], _mm256_set1_epi32(x4[c])));
    }
    total = _mm256_add_epi32(total, _mm256_madd_epi16(pairs, ones));
  }
  return total;
}

// What a block's integer sums need to become values: the code offset
// (code_min * the block's activation codes, in int32), the weight's float
// offsets (offset * the block's activation sum), or both. Known per weight,
// so the inner loop carries only the terms its format has.
enum class Affine { kShifted, kOffsets, kBoth };

// One block of rows 0-7 (half 0) or 8-15 (half 1) of tile t, for activation
// rows [m0, m0 + Rows): added into sums[r]. Always inlined, so that the
// caller's accumulators stay in registers.
template <int Bits, int Group, int Rows, Affine Terms>
__attribute__((always_inline)) inline void block_rows(const Tiles& w, const Rounded& a,
                                                      int64_t k, int64_t tile, int64_t b,
                                                      int64_t m0, int half, __m256* sums) {
  const int64_t blocks = k / kBlock;
  constexpr int kGroups = kBlock / Group;
  // 8-bit codes were multiplied signed: nothing to add back.
  constexpr bool kShift = Bits < 8 && Terms != Affine::kOffsets;
  constexpr bool kOffset = Terms != Affine::kShifted;
  const int64_t tile_block = tile * blocks + b;
  __m256i codes[kChunks];
  unpack_half<Bits>(w, tile_block, half, codes);
  const __m256 first_scales = tile_values(w.scales, w.fp16_scales, tile_block, kGroups, 0, half);
  const __m256 second_scales =
      kGroups == 2 ? tile_values(w.scales, w.fp16_scales, tile_block, kGroups, 1, half)
                   : first_scales;
  const __m256 zero = _mm256_setzero_ps();
  const __m256 first_offsets =
      kOffset ? tile_values(w.offsets, w.fp16_scales, tile_block, kGroups, 0, half) : zero;
  const __m256 second_offsets =
      kOffset && kGroups == 2
          ? tile_values(w.offsets, w.fp16_scales, tile_block, kGroups, 1, half)
          : first_offsets;
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) {
    const int64_t row = m0 + r;
    const int64_t row_block = row * blocks + b;
    const int32_t* x4 = reinterpret_cast<const int32_t*>(a.codes + row * k + b * kBlock);
    const __m256 x_scale = _mm256_set1_ps(a.scales[row_block]);
    __m256& out = sums[r];
    if constexpr (kGroups == 1) {
      __m256i total = chunk_sums<Bits, kChunks>(codes, x4, 0);
      if constexpr (kShift) total = _mm256_add_epi32(total, _mm256_set1_epi32(a.block_offsets[row_block]));
      out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(first_scales, x_scale), out);
      if constexpr (kOffset)
        out = _mm256_fmadd_ps(first_offsets, _mm256_set1_ps(a.block_sums[row_block]), out);
    } else {
      __m256i first_half = chunk_sums<Bits, kChunks / 2>(codes, x4, 0);
      __m256i second_half = chunk_sums<Bits, kChunks / 2>(codes, x4, kChunks / 2);
      if constexpr (kShift) {
        const int32_t* offsets = a.offsets + row_block * 2;
        first_half = _mm256_add_epi32(first_half, _mm256_set1_epi32(offsets[0]));
        second_half = _mm256_add_epi32(second_half, _mm256_set1_epi32(offsets[1]));
      }
      out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(first_half),
                            _mm256_mul_ps(first_scales, x_scale), out);
      out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(second_half),
                            _mm256_mul_ps(second_scales, x_scale), out);
      if constexpr (kOffset) {
        const float* x_sums = a.sums + row_block * 2;
        out = _mm256_fmadd_ps(first_offsets, _mm256_set1_ps(x_sums[0]), out);
        out = _mm256_fmadd_ps(second_offsets, _mm256_set1_ps(x_sums[1]), out);
      }
    }
  }
}

// Output rows of tile t for activation rows [m0, m0 + Rows). One or two
// rows are bound by memory: both halves of each block while its codes are
// in cache, one pass over the weight. More rows are bound by arithmetic: one
// half at a time over all blocks, its accumulators held in registers.
template <int Bits, int Group, int Rows, Affine Terms, typename Out>
inline void tile_terms(const Tiles& w, const Rounded& a, int64_t k, int64_t tile, int64_t m0,
                       int64_t n_out, Out* y) {
  const int64_t blocks = k / kBlock;
  __m256 acc[2][Rows];
  for (int r = 0; r < Rows; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
  if constexpr (Rows <= 2) {
    for (int64_t b = 0; b < blocks; ++b)
#pragma GCC unroll 2
      for (int half = 0; half < 2; ++half)
        block_rows<Bits, Group, Rows, Terms>(w, a, k, tile, b, m0, half, acc[half]);
  } else {
    for (int half = 0; half < 2; ++half) {
      __m256 sums[Rows];
      for (int r = 0; r < Rows; ++r) sums[r] = _mm256_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b)
        block_rows<Bits, Group, Rows, Terms>(w, a, k, tile, b, m0, half, sums);
      for (int r = 0; r < Rows; ++r) acc[half][r] = sums[r];
    }
  }
  const int64_t n0 = tile * kTileRows;
  const int valid = static_cast<int>(n_out - n0 < kTileRows ? n_out - n0 : kTileRows);
  for (int r = 0; r < Rows; ++r) {
    alignas(32) float lanes[kTileRows];
    _mm256_store_ps(lanes, acc[0][r]);
    _mm256_store_ps(lanes + 8, acc[1][r]);
    specray::store_lanes(lanes, y + (m0 + r) * n_out + n0, valid);
  }
}

template <int Bits, int Group, int Rows, typename Out>
inline void tile_rows(const Tiles& w, const Rounded& a, int64_t k, int64_t tile, int64_t m0,
                      int64_t n_out, Out* y) {
  if (w.offsets == nullptr)
    tile_terms<Bits, Group, Rows, Affine::kShifted>(w, a, k, tile, m0, n_out, y);
  else if (w.code_min == 0)
    tile_terms<Bits, Group, Rows, Affine::kOffsets>(w, a, k, tile, m0, n_out, y);
  else
    tile_terms<Bits, Group, Rows, Affine::kBoth>(w, a, k, tile, m0, n_out, y);
}
