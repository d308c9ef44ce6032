// NEON + dotprod kernels (aarch64, ARMv8.2-A). This file alone is compiled with
// -march=armv8.2-a+dotprod+fp16, so everything here has internal linkage: nothing compiled for
// those extensions can be shared with (and picked by the linker for) the portable code.
//
// Q40 x Q80 over rows packed with signed nibbles (repack.h), exact in integers: a lane-indexed
// vdotq multiplies one half run (16 bytes: 4 rows x 4 weights, each 16 (n - 8) after one shift or
// mask of the stored n ^ 8) with 4 activation bytes, leaving the 4 rows' sums in its 4 lanes; then
// convert and one FMA with d_w * d_x, and the result scaled by 1/16 once at the end (exact: a
// power of two).
#include <arm_neon.h>
#include <sys/auxv.h>

#include <vector>

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

// The activations as the packed kernel reads them besides their bytes: d_x as fp32, converted
// once per call, block-major so a tile's tokens are side by side.
struct PackedCtx {
    const BlockQ80* x;
    size_t x_stride_blocks;
    const float* dx;  // block i of activation row b at dx[i * batch + b]
    int batch;
};

// Activation rows per tile (tiling.h): 8 keeps a half group's 8 weight vectors, the tile's 8
// float accumulators and one token's temporaries in 32 registers with no spill (make bench-neon
// reads the loops; 12 gains 3 % and spills).
constexpr int kNeonTileB = 8;
// A one-token tile (decode) reads each group-block in one pass (16 weight vectors); wider tiles go
// over a group twice, rows 0..3 then 4..7 (the group stays in L1 between the passes).
constexpr int kOnePassMaxB = 1;

// One run c of a half group-block against one token: the run's low nibbles (elements 4c..4c+3 of
// 4 rows) with x bytes 4c..4c+3, its high ones with x bytes 16+4c..
template <int C>
int32x4_t dot_run(int32x4_t acc, int8x16_t lo, int8x16_t hi, int8x16_t x0, int8x16_t x1) {
    return vdotq_laneq_s32(vdotq_laneq_s32(acc, lo, x0, C), hi, x1, C);
}

// A block's integer sums (|16 x sum| <= 16 x 8 x 128 x 32 = 2^19) start from the bits of
// kMagic = 1.5 x 2^23, whose ulp is 1: the sum's int32 lanes read as fp32 are then kMagic + sum
// exactly, and one subtraction converts (scvtf would cost two micro-ops, on one pipe only).
constexpr float kMagic = 12582912.0f;

// Rows 4 h0 .. 4 h0 + 3 of a group's first nr rows into yb[0 .. 3] (scaled back by 1/16).
inline void store_rows(float* yb, int h0, float32x4_t acc16, int nr) {
    const float32x4_t v = vmulq_n_f32(acc16, 1.0f / 16);
    const int n = nr - 4 * h0;
    if (n >= 4) {
        vst1q_f32(yb, v);
    } else {
        float out[4];
        vst1q_f32(out, v);
        for (int r = 0; r < n; r++) yb[r] = out[r];
    }
}

// Rows 4h..4h+3 for h in [H0, H0 + H) of one packed group (of which the first nr rows are
// written) against B activation rows from b0, over all nb group-blocks: y[b * y_stride + r].
template <int B, int H0, int H>
void group_rows(const PackedCtx& ctx, int nb, const uint8_t* g, int b0, float* y, size_t y_stride, int nr) {
    const int8x16_t high = vdupq_n_s8(int8_t(0xF0));
    const int32x4_t magic_bits = vreinterpretq_s32_f32(vdupq_n_f32(kMagic));
    const BlockQ80* x[B];
    #pragma GCC unroll 16
    for (int b = 0; b < B; b++) x[b] = ctx.x + size_t(b0 + b) * ctx.x_stride_blocks;
    const float* dx = ctx.dx + b0;
    float32x4_t acc[H][B];
    #pragma GCC unroll 16
    for (int h = 0; h < H; h++)
        #pragma GCC unroll 16
        for (int b = 0; b < B; b++) acc[h][b] = vdupq_n_f32(0.0f);
    for (int i = 0; i < nb; i++, g += kQ40GroupBlockBytes, dx += ctx.batch) {
        DLLAMA_MCA_BEGIN("q40x%c0_q80_batch%c1", 4 * H, B);
        if (H0 == 0) {  // the second pass of a split group reads it from L1
            __builtin_prefetch(g + kPrefetchBytes);
            __builtin_prefetch(g + kPrefetchBytes + 64);
        }
        float32x4_t dw[H];
        int8x16_t lo[H][4], hi[H][4];
        #pragma GCC unroll 16
        for (int h = 0; h < H; h++) {
            dw[h] = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(g + 8 * (H0 + h))));
            #pragma GCC unroll 16
            for (int c = 0; c < 4; c++) {
                const int8x16_t raw = vld1q_s8(reinterpret_cast<const int8_t*>(g + q40_run_offset(c) + 16 * (H0 + h)));
                lo[h][c] = vshlq_n_s8(raw, 4);   // 16 (n - 8), n the low nibble (stored n ^ 8)
                hi[h][c] = vandq_s8(raw, high);  // the same of the high nibble
            }
        }
        #pragma GCC unroll 16
        for (int b = 0; b < B; b++) {
            const int8x16_t x0 = vld1q_s8(x[b][i].qs), x1 = vld1q_s8(x[b][i].qs + 16);
            #pragma GCC unroll 16
            for (int h = 0; h < H; h++) {
                int32x4_t s = dot_run<0>(magic_bits, lo[h][0], hi[h][0], x0, x1);
                s = dot_run<1>(s, lo[h][1], hi[h][1], x0, x1);
                s = dot_run<2>(s, lo[h][2], hi[h][2], x0, x1);
                s = dot_run<3>(s, lo[h][3], hi[h][3], x0, x1);
                const float32x4_t sum = vsubq_f32(vreinterpretq_f32_s32(s), vreinterpretq_f32_s32(magic_bits));
                acc[h][b] = vfmaq_f32(acc[h][b], sum, vmulq_n_f32(dw[h], dx[b]));
            }
        }
        DLLAMA_MCA_END("q40x%c0_q80_batch%c1", 4 * H, B);
    }
    #pragma GCC unroll 16
    for (int h = 0; h < H; h++)
        #pragma GCC unroll 16
        for (int b = 0; b < B; b++)
            if (4 * (H0 + h) < nr) store_rows(y + size_t(b) * y_stride + 4 * (H0 + h), H0 + h, acc[h][b], nr);
}

// One group of 8 packed rows against B activation rows (tiling.h's group policy).
struct GroupQ40 {
    template <int B>
    static void run(const PackedCtx& ctx, int nb, const uint8_t* g, int b0, float* y, size_t y_stride, int nr) {
        if constexpr (B <= kOnePassMaxB) {
            group_rows<B, 0, 2>(ctx, nb, g, b0, y, y_stride, nr);
        } else {
            group_rows<B, 0, 1>(ctx, nb, g, b0, y, y_stride, nr);
            group_rows<B, 1, 1>(ctx, nb, g, b0, y, y_stride, nr);
        }
    }
};

void matmul_q40x8_q80_neon(float* y, size_t y_stride, const uint8_t* w, const BlockQ80* x, size_t x_stride_blocks,
                           int n, int r0, int r1, int batch) {
    const int nb = n / kBlockSize;
    thread_local std::vector<float> dx;  // d_x of every activation block, once per call
    dx.resize(size_t(nb) * batch);
    for (int b = 0; b < batch; b++)
        for (int i = 0; i < nb; i++) dx[size_t(i) * batch + b] = fp16_to_fp32_neon(x[size_t(b) * x_stride_blocks + i].d);
    matmul_q40_groups<GroupQ40, PackedCtx, kNeonTileB>(PackedCtx{x, x_stride_blocks, dx.data(), batch}, y, y_stride, w,
                                                       n, r0, r1, batch);
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
    pack_q40_groups_signed,
};

}  // namespace

const Kernels* kernels_neon() {
    const unsigned long hwcap = getauxval(AT_HWCAP);
    const bool ok = (hwcap & HWCAP_ASIMDDP) && (hwcap & HWCAP_ASIMDHP);
    return ok ? &kNeon : nullptr;
}

}  // namespace dllama
