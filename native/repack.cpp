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
// eight source rows read side by side; place(gb, r, qs) puts row r's 16 nibble bytes into the
// group-block gb. Padding rows: scale +0, zero bytes (weights -8 in the slot layout, 0 in the
// lane layout: either way they add 0).
template <typename Place>
static void pack_groups(const uint8_t* w, size_t row_stride, int rows, int cols, int g0, int g1, uint8_t* out,
                        Place place) {
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
                place(gb, r, src[r][i].qs);
            }
        }
    }
}

void pack_q40_groups(const uint8_t* w, size_t row_stride, int rows, int cols, int g0, int g1, uint8_t* out) {
    pack_groups(w, row_stride, rows, cols, g0, g1, out, [](uint8_t* gb, int r, const uint8_t* qs) {
        std::memcpy(gb + q40_group_qs_offset(r), qs, 16);
    });
}

void pack_q40_groups_lanes(const uint8_t* w, size_t row_stride, int rows, int cols, int g0, int g1, uint8_t* out) {
    pack_groups(w, row_stride, rows, cols, g0, g1, out, [](uint8_t* gb, int r, const uint8_t* qs) {
        for (int c = 0; c < 4; c++) {
            uint8_t* run = gb + q40_lanes_run_offset(r / 4, c) + 4 * (r % 4);
            for (int t = 0; t < 4; t++) run[t] = qs[4 * c + t] ^ 0x88;
        }
    });
}

}  // namespace dllama
