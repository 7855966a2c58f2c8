// bfloat16 bits of a float, shared by the append (a bf16 pool fed float32) and the attention kernel (a
// bf16 reply): round to nearest, ties to even, as NumPy's ml_dtypes does; a NaN stays a quiet NaN.

#pragma once

#include <cstdint>
#include <cstring>

inline uint16_t RoundToBF16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? (u >> 16) | 0x40u : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
