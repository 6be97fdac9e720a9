// Unpacking a block's codes for either inner loop: the layout of
// tiled_matmul.cpp read Width bytes at a time, 64 on AVX-512 (all 16 rows
// of a tile) or 32 on AVX2 (one half of them). Written with GCC's vector
// operators, so that one text serves both widths.
#pragma once

template <int Width>
struct Lanes {
  typedef long long V __attribute__((vector_size(Width)));  // __m256i, __m512i
  typedef unsigned long long U __attribute__((vector_size(Width)));
};

// Every byte set to ``byte``.
template <int Width>
inline typename Lanes<Width>::V splat(uint8_t byte) {
  return typename Lanes<Width>::V{} + static_cast<long long>(0x0101010101010101ULL * byte);
}

template <int Width>
inline typename Lanes<Width>::V load_bytes(const uint8_t* at) {
  typename Lanes<Width>::V v;
  memcpy(&v, at, sizeof v);
  return v;
}

// Bits [from, from + width) of each byte moved to bits [4, 4 + width), the
// rest cleared by the caller's mask. The shifts move whole 64-bit lanes, so
// bits cross into a neighbouring byte, but only into positions the mask
// clears: a left shift by 4 - from fills bits below 4 - from, a right shift
// by from - 4 fills bits from 12 - from up, and from + width <= 8.
template <int Width, int From>
inline typename Lanes<Width>::V high_to_bit4(typename Lanes<Width>::V packed) {
  using U = typename Lanes<Width>::U;
  using V = typename Lanes<Width>::V;
  if constexpr (From < 4) return (V)((U)packed << (4 - From));
  else if constexpr (From > 4) return (V)((U)packed >> (From - 4));
  else return packed;
}

// Chunks (first + J ...) of the 8: their high bits, or-ed in.
template <int Width, int Bits, int J>
inline void add_highs(typename Lanes<Width>::V packed, int first, typename Lanes<Width>::V* codes) {
  if constexpr (J < 8 / (Bits - 4)) {
    constexpr int kWidth = Bits - 4;
    codes[first + J] |= high_to_bit4<Width, J * kWidth>(packed) & splat<Width>(((1 << kWidth) - 1) << 4);
    add_highs<Width, Bits, J + 1>(packed, first, codes);
  }
}

// The 8 chunks of unsigned codes of block tile_block, each read from byte
// ``lane`` of its 64: the chunk's first rows (0) or, on AVX2, rows 8-15 (32).
template <int Width, int Bits>
inline void unpack_codes(const Tiles& w, int64_t tile_block, int lane,
                         typename Lanes<Width>::V* codes) {
  using U = typename Lanes<Width>::U;
  using V = typename Lanes<Width>::V;
  if constexpr (Bits == 8) {
    const uint8_t* at = w.codes + tile_block * kChunks * 64 + lane;
    for (int c = 0; c < kChunks; ++c) codes[c] = load_bytes<Width>(at + c * 64);
  } else {
    const uint8_t* nibbles = w.nibbles + tile_block * 4 * 64 + lane;
    const V low4 = splat<Width>(0x0F);
    for (int c = 0; c < 4; ++c) {
      const V packed = load_bytes<Width>(nibbles + c * 64);
      codes[c] = packed & low4;
      codes[c + 4] = (V)((U)packed >> 4) & low4;
    }
    if constexpr (Bits > 4) {
      constexpr int kWidth = Bits - 4;
      const uint8_t* highs = w.highs + tile_block * kWidth * 64 + lane;
      for (int group = 0; group < kWidth; ++group)
        add_highs<Width, Bits, 0>(load_bytes<Width>(highs + group * 64), group * (8 / kWidth),
                                  codes);
    }
  }
}
