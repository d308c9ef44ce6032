// Block formats shared with GGML (Q4_0 / Q8_0) and Distributed Llama's .m files.
// Blocks hold 32 consecutive values along a row (the input dimension).
#pragma once
#include <cstddef>
#include <cstdint>

namespace dllama {

enum class FloatType : int32_t { F32 = 0, F16 = 1, Q40 = 2, Q80 = 3 };

constexpr int kBlockSize = 32;

//  Q40, 18 bytes:  | d: fp16 | qs[16]: byte j = element j (low nibble), element j+16 (high nibble) |
//  value = (nibble - 8) * d
struct BlockQ40 {
    uint16_t d;
    uint8_t qs[kBlockSize / 2];
};
static_assert(sizeof(BlockQ40) == 18, "Q40 block must be 18 bytes");

//  Q80, 34 bytes:  | d: fp16 | qs[32]: int8 |      value = q * d
struct BlockQ80 {
    uint16_t d;
    int8_t qs[kBlockSize];
};
static_assert(sizeof(BlockQ80) == 34, "Q80 block must be 34 bytes");

// IEEE binary16 <-> binary32, round to nearest even (what F16C and numpy do).
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);

// Bytes taken by one row of n values (n a multiple of 32 for the block types).
size_t row_bytes(FloatType type, size_t n);

}  // namespace dllama
