// The kernel table: every per-element loop of the forward pass, one implementation per
// instruction set. kernels_generic.cpp is the reference; kernels_avx2.cpp and kernels_neon.cpp
// are compiled with their own target flags and picked at start-up from the CPU's features.
//
// Rounding rules every implementation follows bit for bit (tests compare them exactly):
//   quantize_row_q80: amax = max|x|, d = amax / 127, id = d ? 1/d : 0,
//                     q = nearest-even(x * id)          (nearbyintf / _mm256_round_ps / vcvtnq)
//   quantize_row_q40: m = element of largest magnitude (with its sign; +m when both +m and
//                     -m occur, as Distributed Llama's converter), d = m / -8,
//                     id = d ? 1/d : 0, q = min(15, (int)(x * id + 8.5f))
//   the stored scale is fp32_to_fp16(d) in both.
#pragma once
#include <cstddef>
#include <cstdint>

#include "quant.h"
#include "repack.h"

namespace dllama {

struct Kernels {
    const char* name;  // "generic", "avx2", "neon"

    // n is a multiple of 32 for every block kernel.
    void (*quantize_row_q80)(const float* x, BlockQ80* y, int n);
    void (*quantize_row_q40)(const float* x, BlockQ40* y, int n);
    void (*dequantize_row_q80)(const BlockQ80* x, float* y, int n);
    void (*dequantize_row_q40)(const BlockQ40* x, float* y, int n);

    float (*vec_dot_f32)(int n, const float* a, const float* b);
    // y[i] += a * x[i]
    void (*vec_mad_f32)(int n, float* y, const float* x, float a);
    // The same over an F16 row (the KV cache's keys and values with --kv-cache-type f16), and
    // the conversion that stores one: y[i] = fp32_to_fp16(x[i]), rounded to nearest even.
    float (*vec_dot_f16)(int n, const float* a, const uint16_t* b);
    void (*vec_mad_f16)(int n, float* y, const uint16_t* x, float a);
    void (*convert_f32_f16)(const float* x, uint16_t* y, int n);

    // Row range [r0, r1) of y = W x for a batch of activation rows, W a Q40 matrix packed by
    // this set's pack_q40 (repack.h), the form the forward pass binds:
    //   y[b * y_stride + r] = dot(W row r, x row b)   for r in [r0, r1), b in [0, batch)
    // r0 is a multiple of 8; the group holding row r1 - 1 is read whole (its padding rows are
    // part of the packed matrix); only rows [r0, r1) are written. n = input values per row.
    // Each weight row is loaded once and used for the whole batch (prefill reads weights once).
    void (*matmul_q40x8_q80)(float* y, size_t y_stride, const uint8_t* w, const BlockQ80* x,
                             size_t x_stride_blocks, int n, int r0, int r1, int batch);
    // The same over an F32 matrix in place: W row r starts at w + r * w_stride bytes (a stride
    // wider than the row lets a node read a column slice of a bigger matrix in place).
    void (*matmul_f32)(float* y, size_t y_stride, const uint8_t* w, size_t w_stride,
                       const float* x, size_t x_stride, int n, int r0, int r1, int batch);

    // The packer of the nibble encoding this set's matmul_q40x8_q80 reads (repack.h): unsigned
    // unless a set names its own (last, so a set that does not keeps its initializer as it is).
    PackQ40Fn pack_q40 = pack_q40_groups;
};

// Chosen once: the best set the CPU supports, or the portable one when the environment
// variable DLLAMA_KERNELS=generic is set (DLLAMA_KERNELS=avx2|neon asks for one explicitly and
// falls back to generic, with a warning on stderr, when the CPU lacks it).
const Kernels& kernels();

// Every set, for tests. The fast ones return nullptr when not compiled in or not supported.
const Kernels& kernels_generic();
const Kernels* kernels_avx2();
const Kernels* kernels_neon();

}  // namespace dllama
