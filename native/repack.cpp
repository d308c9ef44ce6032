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
// eight source rows read side by side.
void pack_q40_groups(const uint8_t* w, size_t row_stride, int rows, int cols, int g0, int g1, uint8_t* out) {
    const int nb = cols / kBlockSize;
    for (int g = g0; g < g1; g++) {
        const BlockQ40* src[kQ40GroupRows];
        const int nr = rows - g * kQ40GroupRows < kQ40GroupRows ? rows - g * kQ40GroupRows : kQ40GroupRows;
        for (int r = 0; r < nr; r++)
            src[r] = reinterpret_cast<const BlockQ40*>(w + size_t(g * kQ40GroupRows + r) * row_stride);
        uint8_t* gb = out + size_t(g) * q40_group_bytes(cols);
        for (int i = 0; i < nb; i++, gb += kQ40GroupBlockBytes) {
            if (nr < kQ40GroupRows) std::memset(gb, 0, kQ40GroupBlockBytes);  // padding rows: scale +0
            for (int r = 0; r < nr; r++) {
                std::memcpy(gb + 2 * r, &src[r][i].d, 2);
                std::memcpy(gb + q40_group_qs_offset(r), src[r][i].qs, 16);
            }
        }
    }
}

}  // namespace dllama
