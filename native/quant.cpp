// IEEE binary16 <-> binary32 in portable C++ (what F16C / NEON fcvt / numpy do), and row sizes.
#include "quant.h"

#include <cstring>

namespace dllama {

static uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

static float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    const uint32_t man = h & 0x3FFu;
    if (exp == 0x1F) return float_of(sign | 0x7F800000u | (man << 13));  // inf, nan (payload kept)
    if (exp != 0) return float_of(sign | ((exp + 112) << 23) | (man << 13));
    // zero or subnormal: man * 2^-24, exact in binary32
    const float v = float(man) * (1.0f / 16777216.0f);
    return float_of(sign | bits_of(v));
}

uint16_t fp32_to_fp16(float f) {
    const uint32_t x = bits_of(f);
    const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7FFFFFFFu;

    if (ax > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));  // quiet nan
    if (ax >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // >= 65520 rounds to inf
    if (ax < 0x38800000u) {
        // below 2^-14: subnormal result h = round_even(|f| * 2^24)
        if (ax < 0x33000000u) return sign;  // below 2^-25: rounds to zero
        const uint32_t e = ax >> 23;         // 102 ..= 112
        const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
        const uint32_t shift = 126 - e;      // 14 ..= 24
        uint32_t h = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1);
        const uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u))) h++;  // may carry into the smallest normal
        return uint16_t(sign | h);
    }
    // normal: rebias the exponent (127 -> 15) and round the mantissa from 23 to 10 bits
    uint32_t h = (ax - 0x38000000u) >> 13;
    const uint32_t rem = ax & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;  // a carry bumps the exponent
    return uint16_t(sign | h);
}

size_t row_bytes(FloatType type, size_t n) {
    switch (type) {
        case FloatType::F32: return n * 4;
        case FloatType::F16: return n * 2;
        case FloatType::Q40: return n / kBlockSize * sizeof(BlockQ40);
        case FloatType::Q80: return n / kBlockSize * sizeof(BlockQ80);
    }
    return 0;
}

}  // namespace dllama
