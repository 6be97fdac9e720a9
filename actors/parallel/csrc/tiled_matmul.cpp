// Matmuls on GGUF-style quantized blocks, read as stored: 4, 5, 6 or 8 bit
// codes in groups of 32 or 16 input features with one scale (and offset)
// each, with weights tiled by 16 output rows.
//
// y[m, n] = sum_k x[m, k] * (scale[n, k / group] * code[n, k] + offset[n, k / group])
//
// Each 32-value block of an activation row is rounded to int8 on its own
// scale (its largest magnitude becomes 127); the integer products of a block
// are summed exactly in int32 and scaled once per block and row, in float32.
// A row's result depends on that row alone, in the same order of operations
// whatever the number of rows, so a k-row verify equals k one-row decodes.
//
// The tiles put 4 input features of 16 output rows side by side, so one
// instruction multiplies all 16 rows by the same 4 activation codes and a
// block's 16 sums land in one register with no horizontal reduction:
// vpdpbusd on AVX512-VNNI (tile_vnni.h), vpmaddubsw + vpmaddwd on AVX2
// (tile_avx2.h). Which one is compiled is the build's choice (block_kernel.py).
//
// Layout, per tile t of 16 output rows and block b of 32 input features,
// with u = code - code_min (0 .. 2^bits; 8-bit codes as code + 128), and
// chunk c (c = 0..7) the 64 bytes u[16t + i][32b + 4c + j] at byte 4i + j:
//   bits 4-6: nibbles[t, b, 4, 64]: byte = chunk c | chunk (c + 4) << 4
//             highs[t, b, bits - 4, 64]: the bits above the nibble, aligned
//             with the chunks' bytes so that a shift and a mask move them in
//             place: with width w = bits - 4, byte e of high group g holds, at
//             bits [w * j, w * j + w), the high bits of byte e of chunk
//             g * (8 / w) + j (5 bits: chunk c at bit c; 6 bits: chunk 4g + j
//             at bits 2j, 2j + 1)
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

namespace {

using specray::kBlock;
using specray::store;

constexpr int kTileRows = 16;
constexpr int kChunks = kBlock / 4;

struct Tiles {
  const uint8_t* nibbles;
  const uint8_t* highs;
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
  const int32_t* block_offsets;  // [rows, k / 32]: both halves' offsets added
  const float* block_sums;       // [rows, k / 32]: both halves' sums added
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include "tile_vnni.h"
#else
#include "tile_avx2.h"
#endif

// Rows [m0, m0 + count) of tile t in one pass (0 < count <= Rows).
template <int Bits, int Group, int Rows, typename Out>
inline void rows_pass(const Tiles& w, const Rounded& a, int64_t k, int64_t tile, int64_t m0,
                      int64_t count, int64_t n_out, Out* y) {
  if constexpr (Rows > 0) {
    if (count == Rows)
      tile_rows<Bits, Group, Rows>(w, a, k, tile, m0, n_out, y);
    else
      rows_pass<Bits, Group, Rows - 1>(w, a, k, tile, m0, count, n_out, y);
  }
}

template <int Bits, int Group, typename Out>
void tiled(const Tiles& w, const Rounded& a, int64_t rows, int64_t k, int64_t n_out, Out* y,
           int threads) {
  const int64_t tiles = (n_out + kTileRows - 1) / kTileRows;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    // As few passes as kRowTile allows, of near-equal sizes: 17 rows as
    // 6 + 6 + 5, not 8 + 8 + 1 (a pass of one row unpacks every block for
    // a single row).
    const int64_t passes = (rows + kRowTile - 1) / kRowTile;
    for (int64_t pass = 0, m0 = 0; pass < passes; ++pass) {
      const int64_t count = rows / passes + (pass < rows % passes ? 1 : 0);
      rows_pass<Bits, Group, kRowTile>(w, a, k, tile, m0, count, n_out, y);
      m0 += count;
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

// The unsigned code at byte e of chunk c of block (t, b), read from the
// layout without vector code (dequantizing is not on a hot path).
inline int code_byte(const Tiles& w, int64_t tile_block, int c, int e) {
  if (w.bits == 8) return w.codes[(tile_block * kChunks + c) * 64 + e];
  const uint8_t packed = w.nibbles[(tile_block * 4 + c % 4) * 64 + e];
  int u = c < 4 ? packed & 0x0F : packed >> 4;
  if (w.bits > 4) {
    const int width = w.bits - 4, per_byte = 8 / width;
    const uint8_t high = w.highs[(tile_block * width + c / per_byte) * 64 + e];
    u |= ((high >> (width * (c % per_byte))) & ((1 << width) - 1)) << 4;
  }
  return u;
}

inline float value_at(const void* values, int fp16, int64_t index) {
  if (fp16) return _cvtsh_ss(static_cast<const uint16_t*>(values)[index]);
  return static_cast<const float*>(values)[index];
}

// Output rows [first, last) of the weight, dense.
template <typename Out>
void dequantize_tiles(const Tiles& w, int64_t k, int64_t first, int64_t last, Out* out,
                      int threads) {
  const int64_t blocks = k / kBlock;
  const int groups = kBlock / w.group;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = first; n < last; ++n) {
    const int64_t tile = n / kTileRows;
    const int i = static_cast<int>(n % kTileRows);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t tile_block = tile * blocks + b;
      Out* row = out + (n - first) * k + b * kBlock;
      for (int c = 0; c < kChunks; ++c) {
        const int64_t at = (tile_block * groups + (c * 4) / w.group) * kTileRows + i;
        const float scale = value_at(w.scales, w.fp16_scales, at);
        for (int j = 0; j < 4; ++j) {
          const int code = code_byte(w, tile_block, c, 4 * i + j) + w.code_min;
          // Two roundings, as the checkpoint's own dequantizer computes it.
          const float scaled = scale * static_cast<float>(code);
          const float value =
              w.offsets != nullptr ? scaled + value_at(w.offsets, w.fp16_scales, at) : scaled;
          store(value, row + 4 * c + j);
        }
      }
    }
  }
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for a format it does not know.
// x_dtype / y_dtype: 0 float32, 1 bfloat16; code_min is -128 for 8-bit codes.
int specray_tiled_matmul(const void* x, int x_dtype, int64_t rows, int64_t k,
                         const uint8_t* nibbles, const uint8_t* highs, const uint8_t* codes,
                         const void* scales, int fp16_scales, const void* weight_offsets,
                         int bits, int group, int code_min, int64_t n_out, void* y, int y_dtype,
                         int threads) {
  if (k % kBlock || (group != 32 && group != 16)) return 1;
  const specray::RoundedRows rounded = specray::round_rows(x, x_dtype, rows, k, threads);
  thread_local std::vector<int32_t> offsets, block_offsets;
  thread_local std::vector<float> sums, block_sums;
  const int64_t row_blocks = rows * (k / kBlock);
  offsets.resize(static_cast<size_t>(row_blocks * 2));
  sums.resize(static_cast<size_t>(row_blocks * 2));
  block_offsets.resize(static_cast<size_t>(row_blocks));
  block_sums.resize(static_cast<size_t>(row_blocks));
  for (int64_t i = 0; i < row_blocks; ++i) {
    for (int half = 0; half < 2; ++half) {
      offsets[2 * i + half] = code_min * rounded.half_sums[2 * i + half];
      sums[2 * i + half] = rounded.scales[i] * static_cast<float>(rounded.half_sums[2 * i + half]);
    }
    block_offsets[i] = offsets[2 * i] + offsets[2 * i + 1];
    // The order in which the block's two products were added before.
    block_sums[i] = sums[2 * i] + sums[2 * i + 1];
  }
  const Tiles w{nibbles, highs, codes, scales, weight_offsets, bits, group, code_min, fp16_scales};
  const Rounded a{rounded.codes, rounded.scales, offsets.data(), sums.data(), block_offsets.data(),
                  block_sums.data()};
  return specray::with_dtype(y, y_dtype, [&](auto* out) {
    return group == 32 ? tiled_bits<32>(w, a, rows, k, n_out, out, threads)
                       : tiled_bits<16>(w, a, rows, k, n_out, out, threads);
  });
}

int specray_tiled_dequantize(const uint8_t* nibbles, const uint8_t* highs, const uint8_t* codes,
                             const void* scales, int fp16_scales, const void* weight_offsets,
                             int bits, int group, int code_min, int64_t k, int64_t first,
                             int64_t last, void* out, int out_dtype, int threads) {
  if (k % kBlock || (group != 32 && group != 16)) return 1;
  const Tiles w{nibbles, highs, codes, scales, weight_offsets, bits, group, code_min, fp16_scales};
  return specray::with_dtype(out, out_dtype, [&](auto* dense) {
    dequantize_tiles(w, k, first, last, dense, threads);
    return 0;
  });
}

}  // extern "C"

