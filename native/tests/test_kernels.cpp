// Kernel tests: quant.cpp's fp16 conversion against an independent nearest-value search, the
// generic kernels against straightforward double-precision formulas, and every fast set the
// running CPU supports against the generic reference (quantizers and dequantizers bit for bit,
// dot products and matmuls within kRelTol of the sum of |terms|). The packed Q40 matmuls are
// checked against a row-major reference kept here (itself checked against the formula). One
// line per check, then "N passed, M failed"; the exit status is nonzero on any failure.
//
//   test_kernels             run every check (and print informational timings)
//   test_kernels --selected  only print which set kernels() picks (for DLLAMA_KERNELS tests)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"
#include "quant.h"
#include "repack.h"

using namespace dllama;

namespace {

// |fast - reference| <= kRelTol * sum over the dot's terms of |w_i * x_i|
constexpr double kRelTol = 1e-5;

int g_passed = 0;
int g_failed = 0;

void check(bool ok, const std::string& name, const std::string& detail = "") {
    (ok ? g_passed : g_failed)++;
    std::printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.empty() ? "" : " -- ",
                detail.c_str());
    std::fflush(stdout);
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    std::vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

std::mt19937 rng(12345);

float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
float normal() { return std::normal_distribution<float>(0.0f, 1.0f)(rng); }
int irand(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

// ---------------------------------------------------------------------------------------------
// fp16: an independent reference that searches the nearest binary16 value in double precision

double fp16_value_ref(uint16_t h) {  // finite values only
    const int e = (h >> 10) & 0x1F, m = h & 0x3FF;
    const double mag = e == 0 ? std::ldexp(double(m), -24) : std::ldexp(1.0 + m / 1024.0, e - 15);
    return (h & 0x8000) ? -mag : mag;
}

uint16_t fp32_to_fp16_ref(float f) {
    if (std::isnan(f)) return 0x7E00;
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    const double a = std::fabs(double(f));
    if (a >= 65520.0) return sign | 0x7C00;  // at or past the midpoint of 65504 and 2^16
    // binary search among the finite non-negative values 0x0000 ..= 0x7BFF (monotonic)
    uint16_t lo = 0, hi = 0x7BFF;
    if (a >= fp16_value_ref(hi)) return sign | hi;
    while (hi - lo > 1) {
        const uint16_t mid = uint16_t((lo + hi) / 2);
        (fp16_value_ref(mid) <= a ? lo : hi) = mid;
    }
    const double dlo = a - fp16_value_ref(lo), dhi = fp16_value_ref(hi) - a;
    if (dlo < dhi) return sign | lo;
    if (dhi < dlo) return sign | hi;
    return sign | ((lo & 1) ? hi : lo);  // tie: even mantissa
}

void test_fp16() {
    // fp16 -> fp32, every value
    int bad = 0;
    for (uint32_t h = 0; h < 0x10000; h++) {
        const float f = fp16_to_fp32(uint16_t(h));
        const int e = (h >> 10) & 0x1F;
        bool ok;
        if (e == 0x1F && (h & 0x3FF)) ok = std::isnan(f);
        else if (e == 0x1F) ok = std::isinf(f) && (std::signbit(f) == bool(h & 0x8000));
        else ok = double(f) == fp16_value_ref(uint16_t(h)) && std::signbit(f) == bool(h & 0x8000);
        if (!ok) bad++;
    }
    check(bad == 0, "fp16_to_fp32 all 65536 values", fmt("%d wrong", bad));

    // round trip of every non-nan value
    bad = 0;
    for (uint32_t h = 0; h < 0x10000; h++) {
        if (((h >> 10) & 0x1F) == 0x1F && (h & 0x3FF)) continue;
        if (fp32_to_fp16(fp16_to_fp32(uint16_t(h))) != h) bad++;
    }
    check(bad == 0, "fp32_to_fp16 round trip of every non-nan fp16", fmt("%d wrong", bad));

    // every midpoint between neighbours (ties to even) and one float ulp either side
    bad = 0;
    int n = 0;
    for (uint32_t h = 0; h < 0x7C00; h++) {
        const double next = h == 0x7BFF ? 65536.0 : fp16_value_ref(uint16_t(h + 1));
        const float mid = float((fp16_value_ref(uint16_t(h)) + next) / 2);  // exact in float
        for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e30f)}) {
            for (float s : {f, -f}) {
                n++;
                if (fp32_to_fp16(s) != fp32_to_fp16_ref(s)) {
                    if (bad++ < 5)
                        std::printf("  fp32_to_fp16(%a) = %04x, want %04x\n", double(s),
                                    fp32_to_fp16(s), fp32_to_fp16_ref(s));
                }
            }
        }
    }
    check(bad == 0, "fp32_to_fp16 midpoints (ties to even) and their neighbours",
          fmt("%d of %d wrong", bad, n));

    // random bit patterns over the whole float range (nan excluded) and small/large magnitudes
    bad = 0;
    std::uniform_int_distribution<uint32_t> any;
    for (int i = 0; i < 300000; i++) {
        float f = float_of(any(rng));
        if (std::isnan(f)) continue;
        if (i % 3 == 1) f = std::ldexp(uniform(-1.0f, 1.0f), irand(-30, 17));  // around fp16's range
        if (fp32_to_fp16(f) != fp32_to_fp16_ref(f)) bad++;
    }
    check(bad == 0, "fp32_to_fp16 random floats vs nearest-value search", fmt("%d wrong", bad));

    const float inf = std::numeric_limits<float>::infinity();
    const float qnan = std::numeric_limits<float>::quiet_NaN();
    const uint16_t hn = fp32_to_fp16(qnan), hnn = fp32_to_fp16(-qnan);
    const bool special = fp32_to_fp16(inf) == 0x7C00 && fp32_to_fp16(-inf) == 0xFC00 &&
                         fp32_to_fp16(-0.0f) == 0x8000 && fp32_to_fp16(0.0f) == 0 &&
                         fp32_to_fp16(65504.0f) == 0x7BFF && fp32_to_fp16(65519.996f) == 0x7BFF &&
                         fp32_to_fp16(65520.0f) == 0x7C00 && fp32_to_fp16(1.0f) == 0x3C00 &&
                         fp32_to_fp16(std::ldexp(1.0f, -24)) == 0x0001 &&
                         fp32_to_fp16(std::ldexp(1.0f, -25)) == 0x0000 &&
                         fp32_to_fp16(std::ldexp(1.5f, -25)) == 0x0001 &&
                         fp32_to_fp16(std::ldexp(1.0f, -14)) == 0x0400 &&
                         fp32_to_fp16(1e-30f) == 0 && fp32_to_fp16(1e30f) == 0x7C00 &&
                         (hn & 0x7E00) == 0x7E00 && (hnn & 0xFE00) == 0xFE00 &&
                         std::isnan(fp16_to_fp32(hn));
    check(special, "fp32_to_fp16 inf, nan (quiet), signed zero, overflow, subnormal edges");

    const bool rb = row_bytes(FloatType::F32, 100) == 400 && row_bytes(FloatType::F16, 100) == 200 &&
                    row_bytes(FloatType::Q40, 2048) == 64 * 18 &&
                    row_bytes(FloatType::Q80, 2048) == 64 * 34;
    check(rb, "row_bytes of F32, F16, Q40, Q80");
}

// ---------------------------------------------------------------------------------------------
// inputs for the quantizers: name and values (length a multiple of 32)

struct Input {
    std::string name;
    std::vector<float> x;
};

std::vector<Input> quantize_inputs() {
    std::vector<Input> in;
    auto add = [&](std::string name, std::vector<float> x) { in.push_back({std::move(name), std::move(x)}); };

    std::vector<float> x(4096);
    for (float& v : x) v = normal();
    add("normal n=4096", x);

    x.assign(2048, 0.0f);
    for (size_t i = 0; i < x.size(); i++) x[i] = normal() * std::pow(10.0f, float(int(i / 32) % 61 - 30));
    add("per-block scales 1e-30..1e30 n=2048", x);

    x.assign(768, 0.0f);
    for (size_t i = 0; i < x.size(); i++) x[i] = normal() * std::ldexp(1.0f, -int(i / 32) - 8);
    add("scales down to fp16 subnormals n=768", x);

    x.assign(32, 0.0f);
    for (int j = 0; j < 32; j++) x[j] = normal();
    add("one block n=32", x);

    x.assign(96, 0.0f);
    x[33] = -0.0f;
    x[64] = -0.0f;
    x[65] = 0.0f;
    add("all-zero blocks incl. -0 n=96", x);

    x.assign(128, 0.0f);
    x[5] = 3.0f;
    x[32 + 31] = -7.5f;
    x[64] = 1e-20f;
    x[96 + 16] = -65504.0f;
    add("one nonzero per block", x);

    // magnitude ties: +a and -a in one block, in both orders and at several positions
    x.assign(256, 0.0f);
    for (int b = 0; b < 8; b++) {
        for (int j = 0; j < 32; j++) x[b * 32 + j] = uniform(-1.0f, 1.0f);
        const float a = 2.0f + float(b);
        const int p = irand(0, 15), q = irand(16, 31);
        x[b * 32 + p] = (b & 1) ? a : -a;
        x[b * 32 + q] = (b & 1) ? -a : a;
    }
    add("max magnitude ties (+a and -a)", x);

    // q80: amax 127 makes d = 1 and x * id lands exactly on halves (ties to even)
    x.assign(64, 0.0f);
    for (int j = 0; j < 32; j++) x[j] = float(j - 16) + 0.5f;
    x[31] = 127.0f;
    for (int j = 0; j < 32; j++) x[32 + j] = -float(j) - 0.5f;
    x[32] = -127.0f;
    add("exact halves (q80 ties)", x);

    // q40: m = -8 makes d = 1 and x + 8.5 lands on or next to integers
    x.assign(96, 0.0f);
    for (int b = 0; b < 3; b++) {
        for (int j = 0; j < 32; j++) {
            float v = float(j % 16) - 8.0f + 0.5f;
            if (b == 1) v = std::nextafter(v, -100.0f);
            if (b == 2) v = std::nextafter(v, 100.0f);
            x[b * 32 + j] = std::max(-7.99f, std::min(7.99f, v));
        }
        x[b * 32 + 7] = -8.0f;
    }
    add("integer boundaries (q40 truncation)", x);

    // q40: values where a fused x * id + 8.5 would truncate differently from the two roundings
    // kernels.h pins (a kernel that lets the compiler contract them fails here)
    x.clear();
    for (int tries = 0; tries < 2000 && x.size() < 8 * 32; tries++) {
        const float m = -uniform(0.5f, 4.0f);
        const float id = 1.0f / (m / -8.0f);
        std::vector<float> block{m};
        for (int k = 1; k <= 15 && block.size() < 32; k++) {
            float v = (float(k) - 8.5f) / id;
            for (int step = 0; step < 200 && block.size() < 32; step++, v = std::nextafter(v, 100.0f)) {
                const float u = step % 2 ? v : -v;
                if (int(u * id + 8.5f) != int(std::fma(u, id, 8.5f))) block.push_back(u);
            }
        }
        if (block.size() < 2) continue;
        block.resize(32, 0.0f);
        x.insert(x.end(), block.begin(), block.end());
    }
    add(fmt("values sensitive to a fused multiply-add (%zu blocks)", x.size() / 32), x);

    x.assign(128, 0.0f);
    for (int j = 0; j < 128; j++) x[j] = normal() * 1e30f;
    x[3] = 3.0e38f;
    x[40] = -3.3e38f;
    add("huge values (fp16 scale overflows to inf)", x);

    x.assign(2048 + 32, 0.0f);
    for (float& v : x) v = std::round(normal() * 20.0f) / 4.0f;
    add("quarter-integers n=2080", x);
    return in;
}

// the kernels.h rules written out once more, independently of kernels_generic.cpp
void quantize_q80_formula(const float* x, BlockQ80* y, int n) {
    for (int i = 0; i < n / 32; i++) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = std::max(amax, std::fabs(x[i * 32 + j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < 32; j++) y[i].qs[j] = int8_t(std::nearbyint(x[i * 32 + j] * id));
    }
}

void quantize_q40_formula(const float* x, BlockQ40* y, int n) {
    for (int i = 0; i < n / 32; i++) {
        const float* xb = x + i * 32;
        // Distributed Llama's converter: m = min if -min > max, else max (a tie takes +max)
        float top = xb[0], bottom = xb[0];
        for (int j = 1; j < 32; j++) {
            top = std::max(top, xb[j]);
            bottom = std::min(bottom, xb[j]);
        }
        const float m = -bottom > top ? bottom : (top != 0.0f ? top : 0.0f);
        const float d = m / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        uint8_t q[32];
        for (int j = 0; j < 32; j++) q[j] = uint8_t(std::min(15, int(xb[j] * id + 8.5f)));
        for (int j = 0; j < 16; j++) y[i].qs[j] = uint8_t(q[j] | (q[j + 16] << 4));
    }
}

std::string first_block_diff(const void* a, const void* b, size_t block_bytes, size_t nblocks) {
    for (size_t i = 0; i < nblocks; i++) {
        const uint8_t* pa = static_cast<const uint8_t*>(a) + i * block_bytes;
        const uint8_t* pb = static_cast<const uint8_t*>(b) + i * block_bytes;
        for (size_t k = 0; k < block_bytes; k++)
            if (pa[k] != pb[k]) return fmt("block %zu byte %zu: %02x vs %02x", i, k, pa[k], pb[k]);
    }
    return "";
}

// test quantizers of `k` against `ref` (another set, or the formulas when ref is null)
void test_quantize(const Kernels& k, const Kernels* ref) {
    const char* against = ref ? ref->name : "formula";
    for (const Input& in : quantize_inputs()) {
        const int n = int(in.x.size()), nb = n / 32;
        std::vector<BlockQ80> a80(nb), b80(nb);
        std::vector<BlockQ40> a40(nb), b40(nb);
        k.quantize_row_q80(in.x.data(), a80.data(), n);
        k.quantize_row_q40(in.x.data(), a40.data(), n);
        if (ref) {
            ref->quantize_row_q80(in.x.data(), b80.data(), n);
            ref->quantize_row_q40(in.x.data(), b40.data(), n);
        } else {
            quantize_q80_formula(in.x.data(), b80.data(), n);
            quantize_q40_formula(in.x.data(), b40.data(), n);
        }
        std::string d80 = first_block_diff(a80.data(), b80.data(), sizeof(BlockQ80), nb);
        std::string d40 = first_block_diff(a40.data(), b40.data(), sizeof(BlockQ40), nb);
        check(d80.empty(), fmt("%s quantize_row_q80 == %s bit for bit: %s", k.name, against, in.name.c_str()), d80);
        check(d40.empty(), fmt("%s quantize_row_q40 == %s bit for bit: %s", k.name, against, in.name.c_str()), d40);
    }
}

// the documented layout on hand-made blocks
void test_layout(const Kernels& k) {
    float x[32];
    for (int j = 0; j < 16; j++) {
        x[j] = float(j) - 8.0f;  // m = -8 first, d = 1, q = j
        x[j + 16] = 7.0f - float(j);  // q = 15 - j
    }
    BlockQ40 b40;
    k.quantize_row_q40(x, &b40, 32);
    bool ok = b40.d == 0x3C00;
    for (int j = 0; j < 16; j++) ok = ok && b40.qs[j] == uint8_t(j | ((15 - j) << 4));
    check(ok, fmt("%s quantize_row_q40 layout: d = 1, byte j = q[j] | q[j+16] << 4", k.name));

    const float y[6] = {127.0f, -127.0f, 0.5f, 1.5f, 2.5f, -2.5f};
    float xq[32] = {};
    std::memcpy(xq, y, sizeof y);
    BlockQ80 b80;
    k.quantize_row_q80(xq, &b80, 32);
    const int8_t want[6] = {127, -127, 0, 2, 2, -2};
    ok = b80.d == 0x3C00 && std::memcmp(b80.qs, want, 6) == 0;
    for (int j = 6; j < 32; j++) ok = ok && b80.qs[j] == 0;
    check(ok, fmt("%s quantize_row_q80 layout: d = 1, halves to even", k.name));

    // all-zero block: q40 stores d = -0 (m = +0, d = 0 / -8), every nibble 8
    float z[32] = {};
    k.quantize_row_q40(z, &b40, 32);
    ok = b40.d == 0x8000;
    for (int j = 0; j < 16; j++) ok = ok && b40.qs[j] == 0x88;
    k.quantize_row_q80(z, &b80, 32);
    ok = ok && b80.d == 0;
    for (int j = 0; j < 32; j++) ok = ok && b80.qs[j] == 0;
    check(ok, fmt("%s all-zero block: q40 d = -0 and nibbles 8, q80 d = 0 and zeros", k.name));
}

// ---------------------------------------------------------------------------------------------
// random blocks for dot products and matmuls

uint16_t random_scale(float mag) {
    const float d = mag * uniform(0.25f, 1.0f) * (irand(0, 1) ? 1.0f : -1.0f);
    return fp32_to_fp16(d);
}

// weights: random nibbles and scales, with all-zero-scale and extreme blocks mixed in
void fill_q40(BlockQ40* w, size_t nb) {
    for (size_t i = 0; i < nb; i++) {
        const int kind = irand(0, 19);
        w[i].d = random_scale(0.02f);
        for (int j = 0; j < 16; j++) w[i].qs[j] = uint8_t(irand(0, 255));
        if (kind == 0) w[i].d = 0x0000;
        if (kind == 1) w[i].d = 0x8000;
        if (kind == 2) std::memset(w[i].qs, 0x00, 16);  // every value -8
        if (kind == 3) std::memset(w[i].qs, 0xFF, 16);  // every value 7
        if (kind == 4) w[i].d = fp32_to_fp16(60000.0f);
    }
}

void fill_q80(BlockQ80* x, size_t nb) {
    for (size_t i = 0; i < nb; i++) {
        const int kind = irand(0, 19);
        x[i].d = random_scale(0.05f);
        for (int j = 0; j < 32; j++) x[i].qs[j] = int8_t(irand(-128, 127));
        if (kind == 0) x[i].d = 0x0000;
        if (kind == 1) std::memset(x[i].qs, 0x80, 32);  // every value -128
        if (kind == 2) std::memset(x[i].qs, 0x7F, 32);  // every value 127
        if (kind == 3) x[i].d = fp32_to_fp16(1000.0f);
    }
}

struct DotRef {
    double value;
    double sum_abs;
};

DotRef dot_q40_q80_ref(const BlockQ40* w, const BlockQ80* x, int n) {
    DotRef r{0.0, 0.0};
    for (int i = 0; i < n / 32; i++) {
        const double dw = fp16_to_fp32(w[i].d), dx = fp16_to_fp32(x[i].d);
        for (int j = 0; j < 32; j++) {
            const int nib = j < 16 ? (w[i].qs[j] & 0x0F) : (w[i].qs[j - 16] >> 4);
            const double t = (nib - 8) * dw * (x[i].qs[j] * dx);
            r.value += t;
            r.sum_abs += std::fabs(t);
        }
    }
    return r;
}

DotRef dot_f32_ref(const float* a, const float* b, int n) {
    DotRef r{0.0, 0.0};
    for (int i = 0; i < n; i++) {
        const double t = double(a[i]) * double(b[i]);
        r.value += t;
        r.sum_abs += std::fabs(t);
    }
    return r;
}

bool close(double got, double want, double sum_abs, double* worst) {
    const double err = std::fabs(got - want);
    const double rel = sum_abs > 0 ? err / sum_abs : (err == 0 ? 0 : INFINITY);
    if (rel > *worst) *worst = rel;
    return err <= kRelTol * sum_abs;
}

void test_dequantize(const Kernels& k, const Kernels* ref) {
    const char* against = ref ? ref->name : "formula";
    for (int n : {32, 96, 2048}) {
        const int nb = n / 32;
        std::vector<BlockQ40> w(nb);
        std::vector<BlockQ80> x(nb);
        fill_q40(w.data(), nb);
        fill_q80(x.data(), nb);
        if (nb > 1) w[1].d = 0x0001, x[1].d = 0x03FF;  // subnormal scales
        std::vector<float> a(n), b(n), c(n), e(n);
        k.dequantize_row_q40(w.data(), a.data(), n);
        k.dequantize_row_q80(x.data(), c.data(), n);
        if (ref) {
            ref->dequantize_row_q40(w.data(), b.data(), n);
            ref->dequantize_row_q80(x.data(), e.data(), n);
        } else {
            for (int i = 0; i < n; i++) {
                const int blk = i / 32, j = i % 32;
                const int nib = j < 16 ? (w[blk].qs[j] & 0x0F) : (w[blk].qs[j - 16] >> 4);
                b[i] = float(double(nib - 8) * fp16_to_fp32(w[blk].d));
                e[i] = float(double(x[blk].qs[j]) * fp16_to_fp32(x[blk].d));
            }
        }
        check(std::memcmp(a.data(), b.data(), n * 4) == 0,
              fmt("%s dequantize_row_q40 == %s exactly, n=%d", k.name, against, n));
        check(std::memcmp(c.data(), e.data(), n * 4) == 0,
              fmt("%s dequantize_row_q80 == %s exactly, n=%d", k.name, against, n));
    }
}

// k against ref (another set) or, when ref is null, against the double formulas; the F16 ones
// (the KV cache's) over b stored as F16, whose conversion must round exactly as fp32_to_fp16
void test_vec(const Kernels& k, const Kernels* ref) {
    const char* against = ref ? ref->name : "double formula";
    for (int n : {1, 3, 7, 8, 15, 16, 31, 32, 33, 100, 768, 2048, 4096}) {
        double worst = 0, worst16 = 0;
        bool ok = true, ok16 = true, exact16 = true;
        for (int rep = 0; rep < 10; rep++) {
            std::vector<float> a(n), b(n), y(n);
            const float sa = rep == 9 ? 1e15f : 1.0f, sb = rep == 8 ? 1e-20f : 1.0f;
            for (int i = 0; i < n; i++) a[i] = normal() * sa, b[i] = normal() * sb, y[i] = normal();
            const DotRef r = dot_f32_ref(a.data(), b.data(), n);
            const double want = ref ? ref->vec_dot_f32(n, a.data(), b.data()) : r.value;
            ok = close(k.vec_dot_f32(n, a.data(), b.data()), want, r.sum_abs, &worst) && ok;
            // y += s * x elementwise
            const float s = normal();
            std::vector<float> y1 = y, y2 = y;
            k.vec_mad_f32(n, y1.data(), b.data(), s);
            if (ref) ref->vec_mad_f32(n, y2.data(), b.data(), s);
            for (int i = 0; i < n; i++) {
                const double want2 = ref ? double(y2[i]) : double(y[i]) + double(s) * double(b[i]);
                ok = close(y1[i], want2, std::fabs(y[i]) + std::fabs(double(s) * b[i]), &worst) && ok;
            }
            std::vector<uint16_t> bh(n);
            std::vector<float> bw(n);
            k.convert_f32_f16(b.data(), bh.data(), n);
            for (int i = 0; i < n; i++) {
                exact16 = exact16 && bh[i] == fp32_to_fp16(b[i]);
                bw[i] = fp16_to_fp32(bh[i]);
            }
            const DotRef rh = dot_f32_ref(a.data(), bw.data(), n);
            const double want16 = ref ? ref->vec_dot_f16(n, a.data(), bh.data()) : rh.value;
            ok16 = close(k.vec_dot_f16(n, a.data(), bh.data()), want16, rh.sum_abs, &worst16) && ok16;
            std::vector<float> z1 = y, z2 = y;
            k.vec_mad_f16(n, z1.data(), bh.data(), s);
            if (ref) ref->vec_mad_f16(n, z2.data(), bh.data(), s);
            for (int i = 0; i < n; i++) {
                const double want2 = ref ? double(z2[i]) : double(y[i]) + double(s) * double(bw[i]);
                ok16 = close(z1[i], want2, std::fabs(y[i]) + std::fabs(double(s) * bw[i]), &worst16) && ok16;
            }
        }
        check(ok, fmt("%s vec_dot_f32 and vec_mad_f32 ~ %s, n=%d", k.name, against, n),
              fmt("worst rel err %.2e", worst));
        check(exact16, fmt("%s convert_f32_f16 == fp32_to_fp16 exactly, n=%d", k.name, n));
        check(ok16, fmt("%s vec_dot_f16 and vec_mad_f16 ~ %s, n=%d", k.name, against, n),
              fmt("worst rel err %.2e", worst16));
    }
}

// ---------------------------------------------------------------------------------------------
// the row-major Q40 x Q80 reference of the packed kernels: rows of Q40 blocks read in place,
// summed block after block as kernels_generic.cpp's packed kernel does (so that one agrees bit
// for bit); this file is compiled with -ffp-contract=off like the kernels

float vec_dot_q40_q80_reference(int n, const BlockQ40* w, const BlockQ80* x) {
    float sum = 0.0f;
    for (int i = 0; i < n / kBlockSize; i++) {
        int sumi = 0;
        for (int j = 0; j < kBlockSize / 2; j++) {
            sumi += ((w[i].qs[j] & 0x0F) - 8) * x[i].qs[j];
            sumi += ((w[i].qs[j] >> 4) - 8) * x[i].qs[j + kBlockSize / 2];
        }
        sum += float(sumi) * (fp16_to_fp32(w[i].d) * fp16_to_fp32(x[i].d));
    }
    return sum;
}

// rows [r0, r1) of y = W x, W row r at w + r * w_stride bytes (a column slice when wider)
void matmul_q40_q80_reference(float* y, size_t y_stride, const uint8_t* w, size_t w_stride, const BlockQ80* x,
                              size_t x_stride_blocks, int n, int r0, int r1, int batch) {
    for (int r = r0; r < r1; r++) {
        const BlockQ40* wr = reinterpret_cast<const BlockQ40*>(w + size_t(r) * w_stride);
        for (int b = 0; b < batch; b++)
            y[size_t(b) * y_stride + r] = vec_dot_q40_q80_reference(n, wr, x + size_t(b) * x_stride_blocks);
    }
}

// the whole matrix packed (repack.h) in a set's layout, as Transformer::bind packs it across its
// threads
AlignedBytes pack_q40(PackQ40Fn pack, const uint8_t* w, size_t row_stride, int rows, int cols) {
    AlignedBytes out = alloc_packed_q40(rows, cols);
    pack(w, row_stride, rows, cols, 0, q40_groups(rows), out.get());
    return out;
}

// ---------------------------------------------------------------------------------------------
// matmuls on a column slice of a bigger matrix, with padded activation and output rows

struct MatmulCase {
    int rows, n, batch, r0, r1;
    int w_extra;   // extra columns per weight row (blocks for q40, floats for f32)
    int w_col;     // the slice starts this many blocks / floats into the row (<= w_extra)
    int x_extra;   // extra blocks / floats per activation row
    int y_extra;   // extra outputs per output row
};

const MatmulCase kMatmulCases[] = {
    {1, 32, 1, 0, 1, 0, 0, 0, 0},
    {3, 2048, 1, 0, 3, 0, 0, 0, 0},
    {7, 768, 3, 0, 7, 0, 0, 0, 0},
    {33, 4096, 16, 0, 33, 0, 0, 0, 0},
    {16, 32, 16, 0, 16, 0, 0, 0, 0},
    {64, 2048, 5, 13, 50, 7, 3, 2, 5},
    {9, 64, 4, 2, 9, 1, 1, 1, 3},
    {40, 768, 1, 5, 38, 4, 4, 3, 1},
    {12, 2048, 16, 1, 12, 2, 1, 0, 7},
};

const float kSentinel = -1234.5f;

bool check_untouched(const std::vector<float>& y, const MatmulCase& c, size_t y_stride) {
    for (int b = 0; b < c.batch; b++)
        for (size_t r = 0; r < y_stride; r++)
            if ((int(r) < c.r0 || int(r) >= c.r1) && bits_of(y[b * y_stride + r]) != bits_of(kSentinel)) return false;
    return true;
}

// one case: the row-major reference against the double formula; returns ok and updates worst
bool run_reference_q40(const MatmulCase& c, double* worst, bool* untouched) {
    const int nb = c.n / 32;
    const size_t w_stride = size_t(nb + c.w_extra) * sizeof(BlockQ40);
    const size_t x_stride = size_t(nb + c.x_extra);
    const size_t y_stride = size_t(c.rows + c.y_extra);
    std::vector<BlockQ40> wall(size_t(c.rows) * (nb + c.w_extra));
    std::vector<BlockQ80> x(size_t(c.batch) * x_stride);
    fill_q40(wall.data(), wall.size());
    fill_q80(x.data(), x.size());
    const uint8_t* w = reinterpret_cast<const uint8_t*>(wall.data()) + c.w_col * sizeof(BlockQ40);
    std::vector<float> y(c.batch * y_stride, kSentinel);
    matmul_q40_q80_reference(y.data(), y_stride, w, w_stride, x.data(), x_stride, c.n, c.r0, c.r1, c.batch);
    bool ok = true;
    for (int r = c.r0; r < c.r1; r++) {
        const BlockQ40* wr = reinterpret_cast<const BlockQ40*>(w + r * w_stride);
        for (int b = 0; b < c.batch; b++) {
            const DotRef d = dot_q40_q80_ref(wr, x.data() + b * x_stride, c.n);
            ok = close(y[b * y_stride + r], d.value, d.sum_abs, worst) && ok;
        }
    }
    *untouched = check_untouched(y, c, y_stride);
    return ok && *untouched;
}

bool run_matmul_f32(const Kernels& k, const Kernels* ref, const MatmulCase& c, int n, double* worst, bool* untouched) {
    const size_t w_stride = size_t(n + c.w_extra) * sizeof(float);
    const size_t x_stride = size_t(n + c.x_extra);
    const size_t y_stride = size_t(c.rows + c.y_extra);
    std::vector<float> wall(size_t(c.rows) * (n + c.w_extra));
    std::vector<float> x(size_t(c.batch) * x_stride);
    for (float& v : wall) v = normal();
    for (float& v : x) v = normal();
    const uint8_t* w = reinterpret_cast<const uint8_t*>(wall.data() + c.w_col);
    std::vector<float> y(c.batch * y_stride, kSentinel), y2 = y;
    k.matmul_f32(y.data(), y_stride, w, w_stride, x.data(), x_stride, n, c.r0, c.r1, c.batch);
    if (ref) ref->matmul_f32(y2.data(), y_stride, w, w_stride, x.data(), x_stride, n, c.r0, c.r1, c.batch);
    bool ok = true;
    for (int r = c.r0; r < c.r1; r++) {
        const float* wr = reinterpret_cast<const float*>(w + r * w_stride);
        for (int b = 0; b < c.batch; b++) {
            const DotRef d = dot_f32_ref(wr, x.data() + b * x_stride, n);
            const double want = ref ? y2[b * y_stride + r] : d.value;
            ok = close(y[b * y_stride + r], want, d.sum_abs, worst) && ok;
        }
    }
    *untouched = check_untouched(y, c, y_stride);
    return ok && *untouched;
}

std::string describe(const MatmulCase& c, int n) {
    return fmt("rows [%d,%d) of %d, n=%d, batch %d, w +%d cols at col %d, x +%d, y +%d", c.r0, c.r1,
               c.rows, n, c.batch, c.w_extra, c.w_col, c.x_extra, c.y_extra);
}

void test_reference_q40() {
    for (const MatmulCase& c : kMatmulCases) {
        double worst = 0;
        bool untouched = false;
        const bool ok = run_reference_q40(c, &worst, &untouched);
        check(ok, fmt("reference matmul_q40_q80 ~ double formula: %s", describe(c, c.n).c_str()),
              fmt("worst rel err %.2e%s", worst, untouched ? "" : ", wrote outside its rows"));
    }
    double worst = 0;
    bool ok = true, all_untouched = true;
    for (int rows = 1; rows <= 9; rows++) {
        for (int batch = 1; batch <= 9; batch++) {
            bool untouched = false;
            ok = run_reference_q40(MatmulCase{rows + 2, 64, batch, 1, rows + 1, 1, 1, 1, 1}, &worst, &untouched) && ok;
            all_untouched = all_untouched && untouched;
        }
    }
    check(ok, "reference matmul_q40_q80 ~ double formula: rows 1..9 x batch 1..9",
          fmt("worst rel err %.2e%s", worst, all_untouched ? "" : ", wrote outside its rows"));
}

void test_matmul(const Kernels& k, const Kernels* ref) {
    const char* against = ref ? ref->name : "double formula";
    for (const MatmulCase& c : kMatmulCases) {
        for (int n : {c.n, c.n == 32 ? 1 : c.n - 25}) {  // the f32 kernels take any n
            double worst = 0;
            bool untouched = false;
            const bool ok = run_matmul_f32(k, ref, c, n, &worst, &untouched);
            check(ok, fmt("%s matmul_f32 ~ %s: %s", k.name, against, describe(c, n).c_str()),
                  fmt("worst rel err %.2e%s", worst, untouched ? "" : ", wrote outside its rows"));
        }
    }
    // every tile shape: rows 1..9 x batch 1..9 with a row offset
    double worst = 0;
    bool ok = true, all_untouched = true;
    for (int rows = 1; rows <= 9; rows++) {
        for (int batch = 1; batch <= 9; batch++) {
            const MatmulCase c{rows + 2, 64, batch, 1, rows + 1, 1, 1, 1, 1};
            bool untouched = false;
            ok = run_matmul_f32(k, ref, c, 37, &worst, &untouched) && ok;
            all_untouched = all_untouched && untouched;
        }
    }
    check(ok, fmt("%s matmul_f32 ~ %s: rows 1..9 x batch 1..9", k.name, against),
          fmt("worst rel err %.2e%s", worst, all_untouched ? "" : ", wrote outside its rows"));
}

// ---------------------------------------------------------------------------------------------
// packed Q40 (repack.h): the layout, then every set's matmul_q40x8_q80 against the row-major
// reference (generic's packed kernel bit for bit, the fast ones within kRelTol)

// Every group-block of an 11 x 96 column slice (two groups, the second with 5 padding rows),
// each row's scale and 32 weights read back through layout(gb, k, j) = the stored nibble of
// row k's element j, its weight being nibble - 8 in both encodings.
template <typename Read>
bool packed_weights_match(PackQ40Fn pack, Read layout, uint8_t padding_nibble, std::string* detail) {
    const int rows = 11, nb = 3, extra = 2, col = 1;  // a column slice: 3 of 5 blocks, from block 1
    std::vector<BlockQ40> wall(size_t(rows) * (nb + extra));
    fill_q40(wall.data(), wall.size());
    const size_t stride = (nb + extra) * sizeof(BlockQ40);
    const uint8_t* w = reinterpret_cast<const uint8_t*>(wall.data() + col);
    const AlignedBytes p = pack_q40(pack, w, stride, rows, nb * 32);
    bool ok = reinterpret_cast<uintptr_t>(p.get()) % 64 == 0;
    for (int g = 0; g < 2; g++) {
        for (int i = 0; i < nb; i++) {
            const uint8_t* gb = p.get() + g * q40_group_bytes(nb * 32) + i * kQ40GroupBlockBytes;
            for (int k = 0; k < 8; k++) {
                const int r = 8 * g + k;
                const BlockQ40* want = r < rows ? reinterpret_cast<const BlockQ40*>(w + r * stride + i * sizeof(BlockQ40)) : nullptr;
                uint16_t d;
                std::memcpy(&d, gb + 2 * k, 2);
                bool same = d == (want ? want->d : 0);
                for (int j = 0; j < 32; j++) {
                    const int nibble = want ? (j < 16 ? want->qs[j] & 0x0F : want->qs[j - 16] >> 4) : padding_nibble;
                    same = same && layout(gb, k, j) == nibble;
                }
                if (!same && detail->empty()) *detail = fmt("group %d block %d row %d", g, i, k);
                ok = ok && same;
            }
        }
    }
    return ok;
}

// Element j of row k: run c = (j % 16) / 4 after the 16 bytes of scales, 32 bytes a run, byte
// 4k + j % 4 of it, the low nibble for j < 16.
uint8_t run_nibble(const uint8_t* gb, int k, int j) {
    const uint8_t byte = gb[16 + 32 * ((j % 16) / 4) + 4 * k + j % 4];
    return j < 16 ? byte & 0x0F : byte >> 4;
}

void test_pack_layout() {
    std::string detail;
    bool ok = packed_weights_match(pack_q40_groups, run_nibble, 0, &detail);
    check(ok, "pack_q40_groups: 64-byte aligned, scales then 4 runs of 4-byte words of 8 rows, zero padding rows",
          detail);

    detail.clear();
    ok = packed_weights_match(pack_q40_groups_signed, [](const uint8_t* gb, int k, int j) {
        return run_nibble(gb, k, j) ^ 8;
    }, 8, &detail);
    check(ok, "pack_q40_groups_signed: the same runs, nibbles stored ^ 8, padding weights 0", detail);
}

struct PackedCase {
    int rows, n, batch, r0, r1;
    int w_extra, w_col;  // the packed matrix is a column slice: extra blocks per row, first block
};

bool run_matmul_packed(const Kernels& k, const PackedCase& c, bool exact, double* worst, bool* untouched) {
    const int nb = c.n / 32;
    const size_t w_stride = size_t(nb + c.w_extra) * sizeof(BlockQ40);
    std::vector<BlockQ40> wall(size_t(c.rows) * (nb + c.w_extra));
    fill_q40(wall.data(), wall.size());
    const uint8_t* w = reinterpret_cast<const uint8_t*>(wall.data() + c.w_col);
    const AlignedBytes packed = pack_q40(k.pack_q40, w, w_stride, c.rows, c.n);
    const size_t x_stride = nb + 1, y_stride = c.rows + 3;
    std::vector<BlockQ80> x(size_t(c.batch) * x_stride);
    fill_q80(x.data(), x.size());
    std::vector<float> y(c.batch * y_stride, kSentinel), want = y;
    k.matmul_q40x8_q80(y.data(), y_stride, packed.get(), x.data(), x_stride, c.n, c.r0, c.r1, c.batch);
    matmul_q40_q80_reference(want.data(), y_stride, w, w_stride, x.data(), x_stride, c.n, c.r0, c.r1, c.batch);
    bool ok = true;
    for (int r = c.r0; r < c.r1; r++) {
        const BlockQ40* wr = reinterpret_cast<const BlockQ40*>(w + r * w_stride);
        for (int b = 0; b < c.batch; b++) {
            const float got = y[b * y_stride + r], ref = want[b * y_stride + r];
            if (exact) ok = ok && bits_of(got) == bits_of(ref);
            else ok = close(got, ref, dot_q40_q80_ref(wr, x.data() + b * x_stride, c.n).sum_abs, worst) && ok;
        }
    }
    *untouched = check_untouched(y, MatmulCase{c.rows, c.n, c.batch, c.r0, c.r1, 0, 0, 0, 3}, y_stride);
    return ok && *untouched;
}

void test_matmul_packed(const Kernels& k) {
    const bool exact = &k == &kernels_generic();
    const char* how = exact ? "bit for bit" : "within tolerance";
    const PackedCase cases[] = {
        {1, 32, 1, 0, 1, 0, 0},          {7, 2048, 1, 0, 7, 0, 0},       {9, 768, 3, 0, 9, 0, 0},
        {63, 2048, 5, 0, 63, 0, 0},      {64, 4096, 2, 0, 64, 0, 0},     {768, 2048, 1, 0, 768, 0, 0},
        {2048, 768, 1, 0, 2048, 0, 0},   {40, 64, 7, 8, 33, 2, 1},       {63, 2048, 16, 16, 63, 3, 2},
        {17, 32, 4, 8, 16, 1, 0},        {100, 96, 9, 96, 100, 4, 4},    {24, 2048, 1, 8, 9, 0, 0},
        {24, 8192, 5, 8, 23, 1, 1},  // long rows: AVX2 meets the batch in passes of 2, 2 and 1 tokens
    };
    for (const PackedCase& c : cases) {
        double worst = 0;
        bool untouched = false;
        const bool ok = run_matmul_packed(k, c, exact, &worst, &untouched);
        check(ok, fmt("%s matmul_q40x8_q80 ~ reference matmul_q40_q80 %s: rows [%d,%d) of %d, n=%d, batch %d, w +%d at %d",
                      k.name, how, c.r0, c.r1, c.rows, c.n, c.batch, c.w_extra, c.w_col),
              fmt("worst rel err %.2e%s", worst, untouched ? "" : ", wrote outside its rows"));
    }
    // every row count 1..17 x batch 1..7, one-block and two-block rows, whole and partial ranges
    double worst = 0;
    bool ok = true, all_untouched = true;
    for (int rows = 1; rows <= 17; rows++) {
        for (int batch = 1; batch <= 7; batch++) {
            for (int n : {32, 64}) {
                const int r0 = rows > 8 && batch % 2 ? 8 : 0, r1 = rows - (batch % 3 == 0 && rows > r0 + 1);
                bool untouched = false;
                ok = run_matmul_packed(k, PackedCase{rows, n, batch, r0, r1, batch % 2, batch % 2}, exact, &worst,
                                       &untouched) && ok;
                all_untouched = all_untouched && untouched;
            }
        }
    }
    check(ok, fmt("%s matmul_q40x8_q80 ~ reference matmul_q40_q80 %s: rows 1..17 x batch 1..7, n 32 and 64", k.name, how),
          fmt("worst rel err %.2e%s", worst, all_untouched ? "" : ", wrote outside its rows"));
}

// ---------------------------------------------------------------------------------------------
// informational timing: one 2048 x 2048 matmul, one thread

template <typename F>
double best_seconds(F f) {
    // warm up: 2048 x 2048 Q40 is 2.4 MB, so this measures a cache-resident (L2/L3) stream, but
    // for a kernel that prefetches its weights non-temporally (AVX2), which reads them from DRAM
    f();
    double best = 1e30, total = 0;
    for (int rep = 0; rep < 50 && total < 0.3; rep++) {
        const auto t0 = std::chrono::steady_clock::now();
        f();
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = std::min(best, s);
        total += s;
    }
    return best;
}

void time_set(const Kernels& k) {
    const int rows = 2048, n = 2048, nb = n / 32;
    std::vector<BlockQ40> w(size_t(rows) * nb);
    fill_q40(w.data(), w.size());
    std::vector<BlockQ80> x(size_t(16) * nb);
    fill_q80(x.data(), x.size());
    std::vector<float> y(size_t(16) * rows);
    const double wbytes = double(w.size() * sizeof(BlockQ40));
    const uint8_t* wp = reinterpret_cast<const uint8_t*>(w.data());
    const size_t ws = nb * sizeof(BlockQ40);
    const AlignedBytes packed = pack_q40(k.pack_q40, wp, ws, rows, n);
    const double p1 = best_seconds([&] { k.matmul_q40x8_q80(y.data(), rows, packed.get(), x.data(), nb, n, 0, rows, 1); });
    const double p16 = best_seconds([&] { k.matmul_q40x8_q80(y.data(), rows, packed.get(), x.data(), nb, n, 0, rows, 16); });
    std::vector<float> wf(size_t(rows) * n), xf(n);
    for (float& v : wf) v = normal();
    for (float& v : xf) v = normal();
    const double tf = best_seconds([&] {
        k.matmul_f32(y.data(), rows, reinterpret_cast<const uint8_t*>(wf.data()), n * 4, xf.data(), n, n, 0, rows, 1);
    });
    std::printf("TIME %s matmul_q40x8_q80 (packed) 2048x2048 batch 1: %.3f ms, %.2f GB/s of weights\n", k.name,
                p1 * 1e3, wbytes / p1 / 1e9);
    std::printf("TIME %s matmul_q40x8_q80 (packed) 2048x2048 batch 16: %.3f ms, %.2f GB/s of weights, %.2f GMAC/s\n",
                k.name, p16 * 1e3, wbytes / p16 / 1e9, 16.0 * rows * n / p16 / 1e9);
    std::printf("TIME %s matmul_f32 2048x2048 batch 1: %.3f ms, %.2f GB/s of weights\n", k.name, tf * 1e3,
                double(wf.size() * 4) / tf / 1e9);
    std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
    const bool selected_only = argc > 1 && std::strcmp(argv[1], "--selected") == 0;
    const bool timing = !(argc > 1 && std::strcmp(argv[1], "--no-timing") == 0);
    std::printf("kernels() selected: %s\n", kernels().name);
    if (selected_only) return 0;

    const Kernels& generic = kernels_generic();
    std::vector<const Kernels*> fast;
    std::printf("avx2: %s\n", kernels_avx2() ? "available" : "unavailable");
    std::printf("neon: %s\n", kernels_neon() ? "available" : "unavailable");
    if (kernels_avx2()) fast.push_back(kernels_avx2());
    if (kernels_neon()) fast.push_back(kernels_neon());

    test_fp16();

    std::printf("testing kernel set: generic (against formulas)\n");
    test_layout(generic);
    test_quantize(generic, nullptr);
    test_dequantize(generic, nullptr);
    test_vec(generic, nullptr);
    test_matmul(generic, nullptr);
    test_reference_q40();
    test_pack_layout();
    test_matmul_packed(generic);

    for (const Kernels* k : fast) {
        std::printf("testing kernel set: %s (against generic)\n", k->name);
        test_layout(*k);
        test_quantize(*k, &generic);
        test_dequantize(*k, &generic);
        test_vec(*k, &generic);
        test_matmul(*k, &generic);
        test_matmul_packed(*k);
    }
    if (fast.empty()) std::printf("no fast kernel set on this CPU: tested generic only\n");

    if (timing) {
        time_set(generic);
        for (const Kernels* k : fast) time_set(*k);
    }

    std::printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}
