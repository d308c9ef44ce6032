// AVX2 + FMA + F16C kernels (x86-64). This file alone is compiled with -mavx2 -mfma -mf16c, so
// everything here has internal linkage: no inline function or template instantiation compiled
// with AVX2 can be shared with (and picked by the linker for) the portable code.
//
// Q40 x Q80 over packed rows (repack.h), exact in integers: with w the unsigned nibbles (0..15)
// and q the int8 activations, sum((w - 8) * q) = sum(w * q) - 8 * sum(q), the first by maddubs,
// the second once per activation block; then convert and one FMA with d_w * d_x.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace dllama {
namespace {

#include "tiling.h"

float fp16_to_fp32_f16c(uint16_t h) { return _cvtsh_ss(h); }
uint16_t fp32_to_fp16_f16c(float f) { return uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)); }

float hsum_f32x8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

float hmax_f32x8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

void quantize_row_q80_avx2(const float* x, BlockQ80* y, int n) {
    const int nb = n / kBlockSize;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int i = 0; i < nb; i++) {
        const float* xb = x + i * kBlockSize;
        __m256 v0 = _mm256_loadu_ps(xb);
        __m256 v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16);
        __m256 v3 = _mm256_loadu_ps(xb + 24);
        const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                       _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        const float amax = hmax_f32x8(a);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16_f16c(d);
        const __m256 mul = _mm256_set1_ps(id);
        constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        v0 = _mm256_round_ps(_mm256_mul_ps(v0, mul), kRound);
        v1 = _mm256_round_ps(_mm256_mul_ps(v1, mul), kRound);
        v2 = _mm256_round_ps(_mm256_mul_ps(v2, mul), kRound);
        v3 = _mm256_round_ps(_mm256_mul_ps(v3, mul), kRound);
        // int32 -> int16 -> int8; the packs interleave 128-bit lanes, the permute restores order
        const __m256i i01 = _mm256_packs_epi32(_mm256_cvtps_epi32(v0), _mm256_cvtps_epi32(v1));
        const __m256i i23 = _mm256_packs_epi32(_mm256_cvtps_epi32(v2), _mm256_cvtps_epi32(v3));
        const __m256i q = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i01, i23), order);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[i].qs), q);
    }
}

void quantize_row_q40_avx2(const float* x, BlockQ40* y, int n) {
    const int nb = n / kBlockSize;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < nb; i++) {
        const float* xb = x + i * kBlockSize;
        const __m256 v0 = _mm256_loadu_ps(xb);
        const __m256 v1 = _mm256_loadu_ps(xb + 8);
        const __m256 v2 = _mm256_loadu_ps(xb + 16);
        const __m256 v3 = _mm256_loadu_ps(xb + 24);
        const __m256 a0 = _mm256_andnot_ps(sign, v0), a1 = _mm256_andnot_ps(sign, v1);
        const __m256 a2 = _mm256_andnot_ps(sign, v2), a3 = _mm256_andnot_ps(sign, v3);
        const float amax = hmax_f32x8(_mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3)));
        // m = the element of largest magnitude, +amax when both signs occur, +0 for an all-zero
        // block (as generic)
        float m = 0.0f;
        if (amax > 0.0f) {
            const __m256 t = _mm256_set1_ps(amax);
            const int hits = _mm256_movemask_ps(_mm256_cmp_ps(a0, t, _CMP_EQ_OQ)) |
                             _mm256_movemask_ps(_mm256_cmp_ps(a1, t, _CMP_EQ_OQ)) |
                             _mm256_movemask_ps(_mm256_cmp_ps(a2, t, _CMP_EQ_OQ)) |
                             _mm256_movemask_ps(_mm256_cmp_ps(a3, t, _CMP_EQ_OQ));
            const int positive = _mm256_movemask_ps(_mm256_cmp_ps(v0, t, _CMP_EQ_OQ)) |
                                 _mm256_movemask_ps(_mm256_cmp_ps(v1, t, _CMP_EQ_OQ)) |
                                 _mm256_movemask_ps(_mm256_cmp_ps(v2, t, _CMP_EQ_OQ)) |
                                 _mm256_movemask_ps(_mm256_cmp_ps(v3, t, _CMP_EQ_OQ));
            if (hits != 0) m = positive != 0 ? amax : -amax;  // no hit only with a nan in the block
        }
        const float d = m / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16_f16c(d);
        // q = min(15, trunc(x * id + 8.5)): a separate multiply and add (file built with
        // -ffp-contract=off), exactly the generic roundings
        const __m256 mul = _mm256_set1_ps(id);
        const __m256 off = _mm256_set1_ps(8.5f);
        const __m256i top = _mm256_set1_epi32(15);
        const __m256i q0 = _mm256_min_epi32(_mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v0, mul), off)), top);
        const __m256i q1 = _mm256_min_epi32(_mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v1, mul), off)), top);
        const __m256i q2 = _mm256_min_epi32(_mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v2, mul), off)), top);
        const __m256i q3 = _mm256_min_epi32(_mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v3, mul), off)), top);
        // byte j = q[j] | q[j + 16] << 4
        const __m256i lo = _mm256_or_si256(q0, _mm256_slli_epi32(q2, 4));  // bytes 0..7
        const __m256i hi = _mm256_or_si256(q1, _mm256_slli_epi32(q3, 4));  // bytes 8..15
        const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
        const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y[i].qs), bytes);
    }
}

void dequantize_row_q80_avx2(const BlockQ80* x, float* y, int n) {
    const int nb = n / kBlockSize;
    for (int i = 0; i < nb; i++) {
        const __m256 d = _mm256_set1_ps(fp16_to_fp32_f16c(x[i].d));
        float* yb = y + i * kBlockSize;
        for (int k = 0; k < 4; k++) {
            const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x[i].qs + 8 * k));
            _mm256_storeu_ps(yb + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d));
        }
    }
}

void dequantize_row_q40_avx2(const BlockQ40* x, float* y, int n) {
    const int nb = n / kBlockSize;
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i eight = _mm_set1_epi8(8);
    for (int i = 0; i < nb; i++) {
        const __m256 d = _mm256_set1_ps(fp16_to_fp32_f16c(x[i].d));
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[i].qs));
        const __m128i lo = _mm_sub_epi8(_mm_and_si128(raw, m4), eight);
        const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), eight);
        float* yb = y + i * kBlockSize;
        _mm256_storeu_ps(yb, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), d));
        _mm256_storeu_ps(yb + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), d));
        _mm256_storeu_ps(yb + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), d));
        _mm256_storeu_ps(yb + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), d));
    }
}

// An activation block as the packed kernel reads it: its 32 bytes as 8 broadcast words (word c
// = bytes 4c..4c+3 in every 32-bit lane; words 0..3 meet runs 0..3's low nibbles, words 4..7
// their high ones), d_x as fp32 and the correction 8 * sum(q) that turns the unsigned nibbles'
// dot product into (n - 8)'s. Made once per call for every group to reuse, so the kernel's
// broadcasts are plain loads folded into maddubs: a broadcast from memory takes a vector pipe on
// Zen 1, and dropping them took 5 to 10 % off the matmul's time.
struct alignas(32) ActBlock {
    __m256i words[8];
    float d;
    int32_t sum8;
};

// How far ahead of the group-block being read the packed stream is prefetched, two lines per
// 144-byte group-block (the hardware prefetcher fills the odd line it skips). Measured on a 175 MB
// matrix, one thread: no prefetch 0.8 of the plain read bandwidth, 2 to 16 KB ahead 1.0 to 1.1.
// Non-temporal: a token reads each weight once, and the activation blocks are what should stay
// in L2. On Zen 1 with 2 threads each streaming a 75 MB matrix that made the 1-token matmul 8 to
// 14 % faster than T0, and a decode step of the bench preset ~3 % (wider batches alike: their
// group is read again from L1). A matrix small enough to stay in L3 reads slower so.
constexpr int kPackedPrefetchBytes = 8192;

// The activation blocks of one pass over the matrix stay in L2 (512 KB a core on Zen 1) while
// every group of the row range meets them: 8 tokens of 2048 values at a time. A wider batch (a
// prompt) takes several passes, each reading the weights again; the kernel is compute-bound there
// (a pass of 8 tokens spends ~200 cycles on each 144-byte group-block).
constexpr size_t kActPassBytes = 192 * 1024;

struct PackedCtx {
    const ActBlock* act;  // [batch, nb]
};

// One group of 8 packed rows (repack.h) against B activation rows. Run c's low nibbles meet word
// c of the activation block, its high ones word 4 + c: maddubs pairs each row's 4 weights with
// the same 4 activations, so the 8 runs' products add up vertically, each row in its own 2 int16
// lanes (16 products of a nibble 0..15 and an int8: |sum| <= 30720 fits); madd widens and adds
// the pair in row order, minus 8 * sum(x) of the block, convert, one FMA with d_w * d_x.
struct GroupQ40 {
    template <int B>
    static void run(const PackedCtx& ctx, int nb, const uint8_t* g, int b0, float* y, size_t y_stride, int nr) {
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        const __m256i ones = _mm256_set1_epi16(1);
        const ActBlock* xa[B];
        for (int b = 0; b < B; b++) xa[b] = ctx.act + size_t(b0 + b) * nb;
        __m256 acc[B];
        for (int b = 0; b < B; b++) acc[b] = _mm256_setzero_ps();
        for (int i = 0; i < nb; i++, g += kQ40GroupBlockBytes) {
            _mm_prefetch(reinterpret_cast<const char*>(g) + kPackedPrefetchBytes, _MM_HINT_NTA);
            _mm_prefetch(reinterpret_cast<const char*>(g) + kPackedPrefetchBytes + 64, _MM_HINT_NTA);
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g)));
            __m256i lo[4], hi[4];
            for (int c = 0; c < 4; c++) {
                const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + q40_run_offset(c)));
                lo[c] = _mm256_and_si256(raw, m4);
                hi[c] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            }
            for (int b = 0; b < B; b++) {
                const ActBlock& a = xa[b][i];
                __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(lo[0], a.words[0]), _mm256_maddubs_epi16(hi[0], a.words[4]));
                for (int c = 1; c < 4; c++) {
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(lo[c], a.words[c]));
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi[c], a.words[4 + c]));
                }
                const __m256i sum = _mm256_sub_epi32(_mm256_madd_epi16(s, ones), _mm256_set1_epi32(a.sum8));
                const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(a.d));
                acc[b] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum), acc[b]);
            }
        }
        for (int b = 0; b < B; b++) {
            if (nr == kQ40GroupRows) {
                _mm256_storeu_ps(y + size_t(b) * y_stride, acc[b]);
            } else {
                alignas(32) float out[kQ40GroupRows];
                _mm256_store_ps(out, acc[b]);
                for (int r = 0; r < nr; r++) y[size_t(b) * y_stride + r] = out[r];
            }
        }
    }
};

void fill_act_block(const BlockQ80& blk, ActBlock& a) {
    for (int c = 0; c < 8; c++) {
        int32_t word;
        std::memcpy(&word, blk.qs + 4 * c, 4);
        a.words[c] = _mm256_set1_epi32(word);
    }
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qs));
    const __m256i s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), q), _mm256_set1_epi16(1));
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    a.d = fp16_to_fp32_f16c(blk.d);
    a.sum8 = 8 * _mm_cvtsi128_si32(s);
}

void matmul_q40x8_q80_avx2(float* y, size_t y_stride, const uint8_t* w, const BlockQ80* x, size_t x_stride_blocks,
                           int n, int r0, int r1, int batch) {
    const int nb = n / kBlockSize;
    int per_pass = int(std::max<size_t>(1, kActPassBytes / (size_t(nb) * sizeof(ActBlock))));
    if (per_pass > kMaxTileB) per_pass -= per_pass % kMaxTileB;
    thread_local std::vector<ActBlock> act;
    for (int b0 = 0; b0 < batch; b0 += per_pass) {
        const int nt = std::min(per_pass, batch - b0);
        act.resize(size_t(nt) * nb);
        for (int b = 0; b < nt; b++)
            for (int i = 0; i < nb; i++) fill_act_block(x[size_t(b0 + b) * x_stride_blocks + i], act[size_t(b) * nb + i]);
        matmul_q40_groups<GroupQ40>(PackedCtx{act.data()}, y + size_t(b0) * y_stride, y_stride, w, n, r0, r1, nt);
    }
}

// f32: R rows x B activation rows, 8 lanes, then the scalar tail.
template <int R, int B>
void dot_tile_f32(int n, const float* const* w, const float* const* x, float* y, size_t y_stride) {
    __m256 acc[R][B];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) acc[r][b] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 xv[B];
        for (int b = 0; b < B; b++) xv[b] = _mm256_loadu_ps(x[b] + i);
        for (int r = 0; r < R; r++) {
            const __m256 wv = _mm256_loadu_ps(w[r] + i);
            for (int b = 0; b < B; b++) acc[r][b] = _mm256_fmadd_ps(wv, xv[b], acc[r][b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) {
            float sum = hsum_f32x8(acc[r][b]);
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

// one row: four accumulators, 32 values a step, then 8, then the scalar tail
float vec_dot_f32_avx2(int n, const float* a, const float* b) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float sum = hsum_f32x8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

void vec_mad_f32_avx2(int n, float* y, const float* x, float a) {
    const __m256 av = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        for (int k = 0; k < 32; k += 8)
            _mm256_storeu_ps(y + i + k, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i + k), _mm256_loadu_ps(y + i + k)));
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

// keys and values stored as F16: widened 8 at a time by F16C, then as the F32 loops
float vec_dot_f16_avx2(int n, const float* a, const uint16_t* b) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    auto wide = [&](int at) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + at))); };
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), wide(i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), wide(i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), wide(i), s0);
    float sum = hsum_f32x8(_mm256_add_ps(s0, s1));
    for (; i < n; i++) sum += a[i] * fp16_to_fp32_f16c(b[i]);
    return sum;
}

void vec_mad_f16_avx2(int n, float* y, const uint16_t* x, float a) {
    const __m256 av = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 xv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, xv, _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) y[i] += a * fp16_to_fp32_f16c(x[i]);
}

void convert_f32_f16_avx2(const float* x, uint16_t* y, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = fp32_to_fp16_f16c(x[i]);
}

void matmul_f32_avx2(float* y, size_t y_stride, const uint8_t* w, size_t w_stride, const float* x,
                     size_t x_stride, int n, int r0, int r1, int batch) {
    if (batch == 1 && r1 - r0 == 1) {
        y[r0] = vec_dot_f32_avx2(n, reinterpret_cast<const float*>(w + size_t(r0) * w_stride), x);
        return;
    }
    matmul_tiled<TileF32, float, float>(batch == 1 ? 4 : 2, y, y_stride, w, w_stride, x, x_stride, n, r0, r1, batch);
}

const Kernels kAvx2 = {
    "avx2",
    quantize_row_q80_avx2,
    quantize_row_q40_avx2,
    dequantize_row_q80_avx2,
    dequantize_row_q40_avx2,
    vec_dot_f32_avx2,
    vec_mad_f32_avx2,
    vec_dot_f16_avx2,
    vec_mad_f16_avx2,
    convert_f32_f16_avx2,
    matmul_q40x8_q80_avx2,
    matmul_f32_avx2,
};

}  // namespace

const Kernels* kernels_avx2() {
    __builtin_cpu_init();
    const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
    return ok ? &kAvx2 : nullptr;
}

}  // namespace dllama
