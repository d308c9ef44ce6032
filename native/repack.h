// Q40 matrices in the order the matmul kernels stream them, made once when a weight is bound.
//
// Rows go in groups of 8 (the last group padded with zero rows: scale 0, never written out). A
// group is one contiguous run of nb group-blocks, one per 32-column block i:
//
//   | d of rows 0..7 (8 x fp16, 16 bytes) | qs of the rows in slot order 0 4 1 5 2 6 3 7 (8 x 16 bytes) |
//
// 144 bytes = 8 Q40 blocks. The slot order puts rows r and r + 4 side by side, so one 256-bit
// load holds both and the AVX2 kernel's horizontal adds leave the eight row sums in row order;
// the nibble bytes themselves are Q40's (byte j: element j low, element j + 16 high).
//
// That is the slot layout (pack_q40_groups; the generic and AVX2 kernels). A kernel set may read
// another, made by its own packer (Kernels::pack_q40):
//
// The lane layout (pack_q40_groups_lanes; NEON): the same 16 bytes of scales, then 8 runs of 16
// bytes, run 4h + c (h = 0, 1: rows 4h..4h+3; c = 0..3) holding bytes 4c..4c+3 of those four
// rows' Q40 nibble bytes, row after row, each XOR 0x88. One run, low nibbles, is elements
// 4c..4c+3 of four rows (high nibbles: elements 16+4c..), so a lane-indexed dot product against
// 4 activation bytes gives the four rows' sums in its four lanes, no horizontal adds; and a nibble
// n stored as n ^ 8 reads, sign-extended from 4 bits, as n - 8 (the weight itself: no correction).
// Padding rows: scale +0, weights 0.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "quant.h"

namespace dllama {

constexpr int kQ40GroupRows = 8;
constexpr int kQ40GroupBlockBytes = kQ40GroupRows * int(sizeof(BlockQ40));  // 144

// Where row r (0..7) of a group keeps its 16 nibble bytes inside a group-block.
constexpr int q40_group_qs_offset(int r) { return 2 * kQ40GroupRows + 16 * (2 * (r % 4) + r / 4); }

// Bytes of one group: nb group-blocks.
constexpr size_t q40_group_bytes(int cols) { return size_t(cols / kBlockSize) * kQ40GroupBlockBytes; }

struct FreeDeleter {
    void operator()(void* p) const { std::free(p); }
};
using AlignedBytes = std::unique_ptr<uint8_t[], FreeDeleter>;

constexpr int q40_groups(int rows) { return (rows + kQ40GroupRows - 1) / kQ40GroupRows; }

// Uninitialised 64-byte aligned memory for a packed rows x cols matrix.
AlignedBytes alloc_packed_q40(int rows, int cols);

// Where run 4h + c of the lane layout starts inside a group-block.
constexpr int q40_lanes_run_offset(int h, int c) { return 2 * kQ40GroupRows + 16 * (4 * h + c); }

// Groups [g0, g1) of the rows x cols Q40 matrix at w (row r at w + r * row_stride) into out, a
// packed matrix (disjoint group ranges can be packed by different threads): the slot layout.
void pack_q40_groups(const uint8_t* w, size_t row_stride, int rows, int cols, int g0, int g1, uint8_t* out);
// The same in the lane layout.
void pack_q40_groups_lanes(const uint8_t* w, size_t row_stride, int rows, int cols, int g0, int g1, uint8_t* out);
using PackQ40Fn = void (*)(const uint8_t* w, size_t row_stride, int rows, int cols, int g0, int g1, uint8_t* out);

}  // namespace dllama
