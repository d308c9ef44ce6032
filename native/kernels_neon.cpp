// NEON + dotprod kernels (aarch64, ARMv8.2-A). This file alone is compiled with
// -march=armv8.2-a+dotprod+fp16, so everything here has internal linkage: nothing compiled for
// those extensions can be shared with (and picked by the linker for) the portable code.
//
// Q40 x Q80 over packed rows (repack.h), exact in integers: vdotq_s32 multiplies the unsigned
// nibbles (0..15) with the int8 activations on top of the block's sum(-8 * q), so every int32
// lane ends at sum((n - 8) * q); then convert and one FMA with d_w * d_x.
#include <arm_neon.h>
#include <sys/auxv.h>

#include "kernels.h"
#include "mca.h"

#ifndef HWCAP_ASIMDHP
#define HWCAP_ASIMDHP (1 << 10)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif

namespace dllama {
namespace {

#include "tiling.h"

float fp16_to_fp32_neon(uint16_t h) {
    __fp16 v;
    __builtin_memcpy(&v, &h, sizeof v);
    return float(v);
}

uint16_t fp32_to_fp16_neon(float f) {
    const __fp16 v = __fp16(f);  // fcvt, round to nearest even (the default FPCR mode)
    uint16_t h;
    __builtin_memcpy(&h, &v, sizeof h);
    return h;
}

// four int32x4 -> sixteen int8 (values already in range)
int8x16_t narrow_s32x16_s8(int32x4_t a, int32x4_t b, int32x4_t c, int32x4_t d) {
    const int16x8_t ab = vcombine_s16(vqmovn_s32(a), vqmovn_s32(b));
    const int16x8_t cd = vcombine_s16(vqmovn_s32(c), vqmovn_s32(d));
    return vcombine_s8(vqmovn_s16(ab), vqmovn_s16(cd));
}

void quantize_row_q80_neon(const float* x, BlockQ80* y, int n) {
    const int nb = n / kBlockSize;
    for (int i = 0; i < nb; i++) {
        const float* xb = x + i * kBlockSize;
        float32x4_t v[8];
        for (int k = 0; k < 8; k++) v[k] = vld1q_f32(xb + 4 * k);
        float32x4_t a = vabsq_f32(v[0]);
        for (int k = 1; k < 8; k++) a = vmaxq_f32(a, vabsq_f32(v[k]));
        const float amax = vmaxvq_f32(a);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16_neon(d);
        int32x4_t q[8];
        for (int k = 0; k < 8; k++) q[k] = vcvtnq_s32_f32(vmulq_n_f32(v[k], id));  // nearest even
        vst1q_s8(y[i].qs, narrow_s32x16_s8(q[0], q[1], q[2], q[3]));
        vst1q_s8(y[i].qs + 16, narrow_s32x16_s8(q[4], q[5], q[6], q[7]));
    }
}

void quantize_row_q40_neon(const float* x, BlockQ40* y, int n) {
    const int nb = n / kBlockSize;
    const float32x4_t off = vdupq_n_f32(8.5f);
    const int32x4_t top = vdupq_n_s32(15);
    for (int i = 0; i < nb; i++) {
        const float* xb = x + i * kBlockSize;
        float32x4_t v[8];
        for (int k = 0; k < 8; k++) v[k] = vld1q_f32(xb + 4 * k);
        float32x4_t a = vabsq_f32(v[0]);
        for (int k = 1; k < 8; k++) a = vmaxq_f32(a, vabsq_f32(v[k]));
        const float amax = vmaxvq_f32(a);
        // m = the element of largest magnitude, +amax when both signs occur, +0 for an all-zero
        // block (as generic)
        float m = 0.0f;
        if (amax > 0.0f) {
            for (int j = 0; j < kBlockSize; j++) {
                if (xb[j] == amax) {
                    m = amax;
                    break;
                }
                if (xb[j] == -amax) m = -amax;
            }
        }
        const float d = m / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16_neon(d);
        // q = min(15, trunc(x * id + 8.5)): separate multiply and add (file built with
        // -ffp-contract=off), exactly the generic roundings
        int32x4_t q[8];
        for (int k = 0; k < 8; k++) q[k] = vminq_s32(vcvtq_s32_f32(vaddq_f32(vmulq_n_f32(v[k], id), off)), top);
        const uint8x16_t lo = vreinterpretq_u8_s8(narrow_s32x16_s8(q[0], q[1], q[2], q[3]));
        const uint8x16_t hi = vreinterpretq_u8_s8(narrow_s32x16_s8(q[4], q[5], q[6], q[7]));
        vst1q_u8(y[i].qs, vorrq_u8(lo, vshlq_n_u8(hi, 4)));
    }
}

void dequantize_row_q80_neon(const BlockQ80* x, float* y, int n) {
    const int nb = n / kBlockSize;
    for (int i = 0; i < nb; i++) {
        const float d = fp16_to_fp32_neon(x[i].d);
        float* yb = y + i * kBlockSize;
        for (int k = 0; k < 4; k++) {
            const int16x8_t q = vmovl_s8(vld1_s8(x[i].qs + 8 * k));
            vst1q_f32(yb + 8 * k, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(q))), d));
            vst1q_f32(yb + 8 * k + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(q))), d));
        }
    }
}

void dequantize_row_q40_neon(const BlockQ40* x, float* y, int n) {
    const int nb = n / kBlockSize;
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    const int8x16_t eight = vdupq_n_s8(8);
    for (int i = 0; i < nb; i++) {
        const float d = fp16_to_fp32_neon(x[i].d);
        const uint8x16_t raw = vld1q_u8(x[i].qs);
        const int8x16_t half[2] = {vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, m4)), eight),
                                   vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)), eight)};
        float* yb = y + i * kBlockSize;
        for (int h = 0; h < 2; h++) {
            const int16x8_t q0 = vmovl_s8(vget_low_s8(half[h]));
            const int16x8_t q1 = vmovl_s8(vget_high_s8(half[h]));
            vst1q_f32(yb + 16 * h, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(q0))), d));
            vst1q_f32(yb + 16 * h + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(q0))), d));
            vst1q_f32(yb + 16 * h + 8, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(q1))), d));
            vst1q_f32(yb + 16 * h + 12, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(q1))), d));
        }
    }
}

// How far ahead of the group-block being read the packed stream is prefetched, two lines per
// 144-byte group-block (see kernels_avx2.cpp: the dot product's work per byte leaves too few
// loads in flight to hide DRAM latency). Not yet tuned on a Pi 5.
constexpr int kPrefetchBytes = 8192;

struct PackedCtx {
    const BlockQ80* x;
    size_t x_stride_blocks;
};

// One group of 8 packed rows (repack.h) against B activation rows: per row two dot products
// (low nibbles with x0..15, high with x16..31) on top of the block's sum(-8 * q), pairwise adds
// bring four rows' sums into one vector, then one FMA per four rows with their d_w * d_x.
struct GroupQ40 {
    template <int B>
    static void run(const PackedCtx& ctx, int nb, const uint8_t* g, int b0, float* y, size_t y_stride, int nr) {
        const uint8x16_t m4 = vdupq_n_u8(0x0F);
        const int8x16_t minus8 = vdupq_n_s8(-8);
        const BlockQ80* x[B];
        for (int b = 0; b < B; b++) x[b] = ctx.x + size_t(b0 + b) * ctx.x_stride_blocks;
        float32x4_t acc[2][B];  // rows 0..3 and 4..7
        for (int h = 0; h < 2; h++)
            for (int b = 0; b < B; b++) acc[h][b] = vdupq_n_f32(0.0f);
        for (int i = 0; i < nb; i++, g += kQ40GroupBlockBytes) {
            DLLAMA_MCA_BEGIN("q40x8_q80_batch", B);
            __builtin_prefetch(g + kPrefetchBytes);
            __builtin_prefetch(g + kPrefetchBytes + 64);
            const float16x8_t hd = vreinterpretq_f16_u8(vld1q_u8(g));
            const float32x4_t dw[2] = {vcvt_f32_f16(vget_low_f16(hd)), vcvt_high_f32_f16(hd)};
            int8x16_t x0[B], x1[B];
            int32x4_t base[B];
            float dx[B];
            for (int b = 0; b < B; b++) {
                x0[b] = vld1q_s8(x[b][i].qs);
                x1[b] = vld1q_s8(x[b][i].qs + 16);
                base[b] = vdotq_s32(vdotq_s32(vdupq_n_s32(0), minus8, x0[b]), minus8, x1[b]);
                dx[b] = fp16_to_fp32_neon(x[b][i].d);
            }
            for (int h = 0; h < 2; h++) {
                int32x4_t s[B][4];
                for (int k = 0; k < 4; k++) {
                    const uint8x16_t raw = vld1q_u8(g + q40_group_qs_offset(4 * h + k));
                    const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(raw, m4));
                    const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
                    for (int b = 0; b < B; b++) s[b][k] = vdotq_s32(vdotq_s32(base[b], lo, x0[b]), hi, x1[b]);
                }
                for (int b = 0; b < B; b++) {
                    const int32x4_t rows = vpaddq_s32(vpaddq_s32(s[b][0], s[b][1]), vpaddq_s32(s[b][2], s[b][3]));
                    acc[h][b] = vfmaq_f32(acc[h][b], vcvtq_f32_s32(rows), vmulq_n_f32(dw[h], dx[b]));
                }
            }
            DLLAMA_MCA_END("q40x8_q80_batch", B);
        }
        for (int b = 0; b < B; b++) {
            float* yb = y + size_t(b) * y_stride;
            if (nr == kQ40GroupRows) {
                vst1q_f32(yb, acc[0][b]);
                vst1q_f32(yb + 4, acc[1][b]);
            } else {
                float out[kQ40GroupRows];
                vst1q_f32(out, acc[0][b]);
                vst1q_f32(out + 4, acc[1][b]);
                for (int r = 0; r < nr; r++) yb[r] = out[r];
            }
        }
    }
};

void matmul_q40x8_q80_neon(float* y, size_t y_stride, const uint8_t* w, const BlockQ80* x, size_t x_stride_blocks,
                           int n, int r0, int r1, int batch) {
    matmul_q40_groups<GroupQ40>(PackedCtx{x, x_stride_blocks}, y, y_stride, w, n, r0, r1, batch);
}

// f32: R rows x B activation rows, 4 lanes, then the scalar tail.
template <int R, int B>
void dot_tile_f32(int n, const float* const* w, const float* const* x, float* y, size_t y_stride) {
    float32x4_t acc[R][B];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) acc[r][b] = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t xv[B];
        for (int b = 0; b < B; b++) xv[b] = vld1q_f32(x[b] + i);
        for (int r = 0; r < R; r++) {
            const float32x4_t wv = vld1q_f32(w[r] + i);
            for (int b = 0; b < B; b++) acc[r][b] = vfmaq_f32(acc[r][b], wv, xv[b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) {
            float sum = vaddvq_f32(acc[r][b]);
            for (int k = i; k < n; k++) sum += w[r][k] * x[b][k];
            y[size_t(b) * y_stride + r] = sum;
        }
}

struct TileF32 {
    template <int R, int B>
    static void run(int n, const float* const* w, const float* const* x, float* y, size_t y_stride) {
        dot_tile_f32<R, B>(n, w, x, y, y_stride);
    }
};

// one row: four accumulators, 16 values a step, then 4, then the scalar tail
float vec_dot_f32_neon(int n, const float* a, const float* b) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4) s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
    float sum = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

void vec_mad_f32_neon(int n, float* y, const float* x, float a) {
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        for (int k = 0; k < 16; k += 4) vst1q_f32(y + i + k, vfmaq_n_f32(vld1q_f32(y + i + k), vld1q_f32(x + i + k), a));
    }
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] += a * x[i];
}

// keys and values stored as F16: widened 4 at a time (fcvtl), then as the F32 loops
float16x4_t load_f16x4(const uint16_t* p) { return vreinterpret_f16_u16(vld1_u16(p)); }

float vec_dot_f16_neon(int n, const float* a, const uint16_t* b) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vcvt_f32_f16(load_f16x4(b + i)));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vcvt_f32_f16(load_f16x4(b + i + 4)));
    }
    for (; i + 4 <= n; i += 4) s0 = vfmaq_f32(s0, vld1q_f32(a + i), vcvt_f32_f16(load_f16x4(b + i)));
    float sum = vaddvq_f32(vaddq_f32(s0, s1));
    for (; i < n; i++) sum += a[i] * fp16_to_fp32(b[i]);
    return sum;
}

void vec_mad_f16_neon(int n, float* y, const uint16_t* x, float a) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vcvt_f32_f16(load_f16x4(x + i)), a));
    for (; i < n; i++) y[i] += a * fp16_to_fp32(x[i]);
}

void convert_f32_f16_neon(const float* x, uint16_t* y, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
    for (; i < n; i++) y[i] = fp32_to_fp16(x[i]);
}

void matmul_f32_neon(float* y, size_t y_stride, const uint8_t* w, size_t w_stride, const float* x,
                     size_t x_stride, int n, int r0, int r1, int batch) {
    if (batch == 1 && r1 - r0 == 1) {
        y[r0] = vec_dot_f32_neon(n, reinterpret_cast<const float*>(w + size_t(r0) * w_stride), x);
        return;
    }
    matmul_tiled<TileF32, float, float>(batch == 1 ? 4 : 2, y, y_stride, w, w_stride, x, x_stride, n, r0, r1, batch);
}

const Kernels kNeon = {
    "neon",
    quantize_row_q80_neon,
    quantize_row_q40_neon,
    dequantize_row_q80_neon,
    dequantize_row_q40_neon,
    vec_dot_f32_neon,
    vec_mad_f32_neon,
    vec_dot_f16_neon,
    vec_mad_f16_neon,
    convert_f32_f16_neon,
    matmul_q40x8_q80_neon,
    matmul_f32_neon,
};

}  // namespace

const Kernels* kernels_neon() {
    const unsigned long hwcap = getauxval(AT_HWCAP);
    const bool ok = (hwcap & HWCAP_ASIMDDP) && (hwcap & HWCAP_ASIMDHP);
    return ok ? &kNeon : nullptr;
}

}  // namespace dllama
