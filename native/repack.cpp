#include "repack.h"

#include <cstring>
#include <new>

namespace dllama {

AlignedBytes alloc_packed_q40(int rows, int cols) {
    size_t bytes = q40_group_bytes(cols) * q40_groups(rows);
    bytes = (bytes + 63) / 64 * 64;  // aligned_alloc wants a multiple of the alignment
    AlignedBytes out(static_cast<uint8_t*>(std::aligned_alloc(64, bytes ? bytes : 64)));
    if (!out) throw std::bad_alloc();
    return out;
}

// Written front to back (the destination is fresh memory: its first touch is the cost), the
// eight source rows read side by side, each row's nibble bytes XOR flip (0, or 0x88 in every
// byte). Padding rows are zero bytes (repack.h).
static void pack_groups(const uint8_t* w, size_t row_stride, int rows, int cols, int g0, int g1, uint8_t* out,
                        uint32_t flip) {
    const int nb = cols / kBlockSize;
    for (int g = g0; g < g1; g++) {
        const BlockQ40* src[kQ40GroupRows];
        const int nr = rows - g * kQ40GroupRows < kQ40GroupRows ? rows - g * kQ40GroupRows : kQ40GroupRows;
        for (int r = 0; r < nr; r++)
            src[r] = reinterpret_cast<const BlockQ40*>(w + size_t(g * kQ40GroupRows + r) * row_stride);
        uint8_t* gb = out + size_t(g) * q40_group_bytes(cols);
        for (int i = 0; i < nb; i++, gb += kQ40GroupBlockBytes) {
            if (nr < kQ40GroupRows) std::memset(gb, 0, kQ40GroupBlockBytes);
            for (int r = 0; r < nr; r++) {
                std::memcpy(gb + 2 * r, &src[r][i].d, 2);
                for (int c = 0; c < 4; c++) {
                    uint32_t word;
                    std::memcpy(&word, src[r][i].qs + 4 * c, 4);
                    word ^= flip;
                    std::memcpy(gb + q40_run_offset(c) + 4 * r, &word, 4);
                }
            }
        }
    }
}

void pack_q40_groups(const uint8_t* w, size_t row_stride, int rows, int cols, int g0, int g1, uint8_t* out) {
    pack_groups(w, row_stride, rows, cols, g0, g1, out, 0);
}

void pack_q40_groups_signed(const uint8_t* w, size_t row_stride, int rows, int cols, int g0, int g1, uint8_t* out) {
    pack_groups(w, row_stride, rows, cols, g0, g1, out, 0x88888888u);
}

}  // namespace dllama
