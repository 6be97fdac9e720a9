// Unpacking a block's codes for either inner loop. Both read the layout of
// tiled_matmul.cpp through the same shifts and masks; they differ only in
// the vector width: 64 bytes (AVX-512, all 16 rows of a tile) or 32 (AVX2,
// one half of them). The including header passes its width's byte
// operations as Ops: a vector type V and load, splat, bit_and, bit_or,
// shift_left16<N>, shift_right16<N>.
#pragma once

// Bits [from, from + width) of each byte moved to bits [4, 4 + width), the
// rest cleared by the caller's mask. The 16-bit shifts carry bits across the
// two bytes of a lane only into positions the mask clears.
template <typename Ops, int From>
inline typename Ops::V high_to_bit4(typename Ops::V packed) {
  if constexpr (From < 4) return Ops::template shift_left16<4 - From>(packed);
  else if constexpr (From > 4) return Ops::template shift_right16<From - 4>(packed);
  else return packed;
}

// Chunks (first + J ...) of the 8: their high bits, or-ed in.
template <typename Ops, int Bits, int J>
inline void add_highs(typename Ops::V packed, int first, typename Ops::V* codes) {
  if constexpr (J < 8 / (Bits - 4)) {
    constexpr int kWidth = Bits - 4;
    const typename Ops::V mask = Ops::splat(static_cast<char>(((1 << kWidth) - 1) << 4));
    codes[first + J] = Ops::bit_or(
        codes[first + J], Ops::bit_and(high_to_bit4<Ops, J * kWidth>(packed), mask));
    add_highs<Ops, Bits, J + 1>(packed, first, codes);
  }
}

// The 8 chunks of unsigned codes of block tile_block, each read from byte
// ``lane`` of its 64: the chunk's first rows (0) or, on AVX2, rows 8-15 (32).
template <typename Ops, int Bits>
inline void unpack_codes(const Tiles& w, int64_t tile_block, int lane, typename Ops::V* codes) {
  using V = typename Ops::V;
  if constexpr (Bits == 8) {
    const uint8_t* at = w.codes + tile_block * kChunks * 64 + lane;
    for (int c = 0; c < kChunks; ++c) codes[c] = Ops::load(at + c * 64);
  } else {
    const uint8_t* nibbles = w.nibbles + tile_block * 4 * 64 + lane;
    const V low4 = Ops::splat(0x0F);
    for (int c = 0; c < 4; ++c) {
      const V packed = Ops::load(nibbles + c * 64);
      codes[c] = Ops::bit_and(packed, low4);
      codes[c + 4] = Ops::bit_and(Ops::template shift_right16<4>(packed), low4);
    }
    if constexpr (Bits > 4) {
      constexpr int kWidth = Bits - 4;
      const uint8_t* highs = w.highs + tile_block * kWidth * 64 + lane;
      for (int group = 0; group < kWidth; ++group)
        add_highs<Ops, Bits, 0>(Ops::load(highs + group * 64), group * (8 / kWidth), codes);
    }
  }
}
