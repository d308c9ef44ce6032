#include "repack.h"

#include <cstring>
#include <new>

namespace dllama {

AlignedBytes pack_q40(const uint8_t* w, size_t row_stride, int rows, int cols) {
    const int nb = cols / kBlockSize;
    const int groups = (rows + kQ40GroupRows - 1) / kQ40GroupRows;
    const size_t group_bytes = q40_group_bytes(cols);
    size_t bytes = group_bytes * groups;
    bytes = (bytes + 63) / 64 * 64;  // aligned_alloc wants a multiple of the alignment
    AlignedBytes out(static_cast<uint8_t*>(std::aligned_alloc(64, bytes ? bytes : 64)));
    if (!out) throw std::bad_alloc();
    std::memset(out.get(), 0, bytes);  // padding rows: scale +0, so they add nothing
    for (int g = 0; g < groups; g++) {
        uint8_t* dst = out.get() + g * group_bytes;
        const int nr = rows - g * kQ40GroupRows < kQ40GroupRows ? rows - g * kQ40GroupRows : kQ40GroupRows;
        for (int r = 0; r < nr; r++) {
            const BlockQ40* src = reinterpret_cast<const BlockQ40*>(w + size_t(g * kQ40GroupRows + r) * row_stride);
            for (int i = 0; i < nb; i++) {
                uint8_t* gb = dst + size_t(i) * kQ40GroupBlockBytes;
                std::memcpy(gb + 2 * r, &src[i].d, 2);
                std::memcpy(gb + q40_group_qs_offset(r), src[i].qs, 16);
            }
        }
    }
    return out;
}

}  // namespace dllama
