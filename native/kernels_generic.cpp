// The portable reference of every kernel in kernels.h. Plain loops in a fixed order; the fast sets
// (kernels_avx2.cpp, kernels_neon.cpp) are tested against these. Compiled with
// -ffp-contract=off so a target with FMA does not fuse the quantizers' x*id + 8.5 and the results
// stay bit-identical to the SIMD versions, which do the same two roundings.
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace dllama {

// amax = max|x|, d = amax / 127, q = nearest-even(x / d)
static void quantize_row_q80_generic(const float* x, BlockQ80* y, int n) {
    const int nb = n / kBlockSize;
    for (int i = 0; i < nb; i++) {
        const float* xb = x + i * kBlockSize;
        float amax = 0.0f;
        for (int j = 0; j < kBlockSize; j++) {
            const float a = std::fabs(xb[j]);
            if (a > amax) amax = a;
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < kBlockSize; j++) y[i].qs[j] = int8_t(std::nearbyint(xb[j] * id));
    }
}

// m = the element of largest magnitude, the positive one when both signs occur (+0 when the
// block is all zeros), d = m / -8, q = min(15, trunc(x / d + 8.5)); byte j = q[j] | q[j + 16] << 4
static void quantize_row_q40_generic(const float* x, BlockQ40* y, int n) {
    const int nb = n / kBlockSize;
    for (int i = 0; i < nb; i++) {
        const float* xb = x + i * kBlockSize;
        float amax = 0.0f;
        float m = 0.0f;
        for (int j = 0; j < kBlockSize; j++) {
            const float a = std::fabs(xb[j]);
            if (amax < a || (amax == a && xb[j] > 0.0f)) {
                amax = a;
                m = xb[j];
            }
        }
        const float d = m / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < kBlockSize / 2; j++) {
            const float x0 = xb[j] * id;
            const float x1 = xb[j + kBlockSize / 2] * id;
            int q0 = int(x0 + 8.5f);
            int q1 = int(x1 + 8.5f);
            if (q0 > 15) q0 = 15;
            if (q1 > 15) q1 = 15;
            y[i].qs[j] = uint8_t(q0 | (q1 << 4));
        }
    }
}

static void dequantize_row_q80_generic(const BlockQ80* x, float* y, int n) {
    const int nb = n / kBlockSize;
    for (int i = 0; i < nb; i++) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < kBlockSize; j++) y[i * kBlockSize + j] = float(x[i].qs[j]) * d;
    }
}

static void dequantize_row_q40_generic(const BlockQ40* x, float* y, int n) {
    const int nb = n / kBlockSize;
    for (int i = 0; i < nb; i++) {
        const float d = fp16_to_fp32(x[i].d);
        float* yb = y + i * kBlockSize;
        for (int j = 0; j < kBlockSize / 2; j++) {
            yb[j] = float((x[i].qs[j] & 0x0F) - 8) * d;
            yb[j + kBlockSize / 2] = float((x[i].qs[j] >> 4) - 8) * d;
        }
    }
}

// eight partial sums in a fixed order (lets the compiler vectorize without reassociating)
static float vec_dot_f32_generic(int n, const float* a, const float* b) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    float sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static void vec_mad_f32_generic(int n, float* y, const float* x, float a) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static float vec_dot_f16_generic(int n, const float* a, const uint16_t* b) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * fp16_to_fp32(b[i + k]);
    float sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) sum += a[i] * fp16_to_fp32(b[i]);
    return sum;
}

static void vec_mad_f16_generic(int n, float* y, const uint16_t* x, float a) {
    for (int i = 0; i < n; i++) y[i] += a * fp16_to_fp32(x[i]);
}

static void convert_f32_f16_generic(const float* x, uint16_t* y, int n) {
    for (int i = 0; i < n; i++) y[i] = fp32_to_fp16(x[i]);
}

// Row by row over the packed groups, block after block: sum over blocks of d_w * d_x * (the
// block's integer dot). The row-major reference in tests/test_kernels.cpp sums in this order
// over the unpacked matrix, and the two agree bit for bit.
static void matmul_q40x8_q80_generic(float* y, size_t y_stride, const uint8_t* w, const BlockQ80* x,
                                     size_t x_stride_blocks, int n, int r0, int r1, int batch) {
    const int nb = n / kBlockSize;
    for (int r = r0; r < r1; r++) {
        const uint8_t* group = w + size_t(r / kQ40GroupRows) * q40_group_bytes(n);
        const int k = r % kQ40GroupRows;
        for (int b = 0; b < batch; b++) {
            const BlockQ80* xb = x + size_t(b) * x_stride_blocks;
            float sum = 0.0f;
            for (int i = 0; i < nb; i++) {
                const uint8_t* gb = group + size_t(i) * kQ40GroupBlockBytes;
                uint16_t d;
                std::memcpy(&d, gb + 2 * k, 2);
                int sumi = 0;
                for (int j = 0; j < kBlockSize / 2; j++) {
                    const uint8_t q = gb[q40_run_offset(j / 4) + 4 * k + j % 4];  // the Q40 block's byte j
                    sumi += ((q & 0x0F) - 8) * xb[i].qs[j];
                    sumi += ((q >> 4) - 8) * xb[i].qs[j + kBlockSize / 2];
                }
                sum += float(sumi) * (fp16_to_fp32(d) * fp16_to_fp32(xb[i].d));
            }
            y[size_t(b) * y_stride + r] = sum;
        }
    }
}

static void matmul_f32_generic(float* y, size_t y_stride, const uint8_t* w, size_t w_stride,
                               const float* x, size_t x_stride, int n, int r0, int r1, int batch) {
    for (int r = r0; r < r1; r++) {
        const float* wr = reinterpret_cast<const float*>(w + size_t(r) * w_stride);
        for (int b = 0; b < batch; b++)
            y[size_t(b) * y_stride + r] = vec_dot_f32_generic(n, wr, x + size_t(b) * x_stride);
    }
}

static const Kernels kGeneric = {
    "generic",
    quantize_row_q80_generic,
    quantize_row_q40_generic,
    dequantize_row_q80_generic,
    dequantize_row_q40_generic,
    vec_dot_f32_generic,
    vec_mad_f32_generic,
    vec_dot_f16_generic,
    vec_mad_f16_generic,
    convert_f32_f16_generic,
    matmul_q40x8_q80_generic,
    matmul_f32_generic,
};

const Kernels& kernels_generic() { return kGeneric; }

}  // namespace dllama
