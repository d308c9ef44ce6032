// Q40 matrices in the order the matmul kernels stream them, made once when a weight is bound.
//
// Rows go in groups of 8 (the last group padded with zero rows: scale 0, never written out). A
// group is one contiguous run of nb group-blocks, one per 32-column block i:
//
//   | d of rows 0..7 (8 x fp16, 16 bytes) | run 0 | run 1 | run 2 | run 3 |   (4 x 32 bytes)
//
// 144 bytes = 8 Q40 blocks. Run c holds bytes 4c..4c+3 of each row's 16 Q40 nibble bytes, row 0
// first: its low nibbles are elements 4c..4c+3 of the 8 rows, its high ones elements 16+4c..
// So a product whose lanes pair 4 weight bytes with the same 4 activation bytes (maddubs against
// a broadcast 32-bit word, sdot by lane) sums each row in its own lanes: no horizontal adds.
//
// Two encodings of the nibbles, each set's packer (Kernels::pack_q40) picks one:
//   unsigned, as Q40 stores them, n = w + 8 (pack_q40_groups; generic and AVX2: maddubs takes
//     unsigned bytes, and the kernel subtracts 8 * sum(x) once per activation block);
//   signed, n ^ 8 (pack_q40_groups_signed; NEON): sign-extended from 4 bits it reads w itself.
// Padding rows: scale +0, weights -8 (unsigned) or 0 (signed): either way they add 0.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "quant.h"

namespace dllama {

constexpr int kQ40GroupRows = 8;
constexpr int kQ40GroupBlockBytes = kQ40GroupRows * int(sizeof(BlockQ40));  // 144

// Where run c (0..3) starts inside a group-block; row r's 4 bytes are at 4r from there.
constexpr int q40_run_offset(int c) { return 2 * kQ40GroupRows + 32 * c; }

// Bytes of one group: nb group-blocks.
constexpr size_t q40_group_bytes(int cols) { return size_t(cols / kBlockSize) * kQ40GroupBlockBytes; }

struct FreeDeleter {
    void operator()(void* p) const { std::free(p); }
};
using AlignedBytes = std::unique_ptr<uint8_t[], FreeDeleter>;

constexpr int q40_groups(int rows) { return (rows + kQ40GroupRows - 1) / kQ40GroupRows; }

// Uninitialised 64-byte aligned memory for a packed rows x cols matrix.
AlignedBytes alloc_packed_q40(int rows, int cols);

// Groups [g0, g1) of the rows x cols Q40 matrix at w (row r at w + r * row_stride) into out, a
// packed matrix (disjoint group ranges can be packed by different threads): unsigned nibbles.
void pack_q40_groups(const uint8_t* w, size_t row_stride, int rows, int cols, int g0, int g1, uint8_t* out);
// The same with signed nibbles (n ^ 8).
void pack_q40_groups_signed(const uint8_t* w, size_t row_stride, int rows, int cols, int g0, int g1, uint8_t* out);
using PackQ40Fn = void (*)(const uint8_t* w, size_t row_stride, int rows, int cols, int g0, int g1, uint8_t* out);

}  // namespace dllama
