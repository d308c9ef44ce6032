#include "ops.h"

#include <cmath>

namespace dllama {

void rmsnorm(float* y, const float* x, const float* w, int n, float eps) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float scale = (float)(1.0 / std::sqrt(ss / n + eps));
    for (int i = 0; i < n; i++) y[i] = x[i] * scale * w[i];
}

void softmax(float* x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++) max = x[i] > max ? x[i] : max;
    double sum = 0;
    for (int i = 0; i < n; i++) {
        x[i] = std::exp(x[i] - max);
        sum += x[i];
    }
    const float inv = (float)(1.0 / sum);
    for (int i = 0; i < n; i++) x[i] *= inv;
}

void silu_mul(float* y, const float* g, const float* u, int n) {
    for (int i = 0; i < n; i++) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

RopeTable::RopeTable(int head_dim, int max_seq_len, double theta, Scaling scaling)
    : half_(head_dim / 2), cos_((size_t)max_seq_len * half_), sin_((size_t)max_seq_len * half_) {
    std::vector<double> inv_freq(half_);
    for (int i = 0; i < half_; i++) {
        double f = 1.0 / std::pow(theta, (2.0 * i) / head_dim);
        if (scaling.factor > 0) {
            // llama3: long wavelengths slowed by the factor, short ones kept, a smooth ramp between.
            const double low_wavelen = scaling.orig_max_seq_len / scaling.low_freq_factor;
            const double high_wavelen = scaling.orig_max_seq_len / scaling.high_freq_factor;
            const double wavelen = 2.0 * M_PI / f;
            if (wavelen > low_wavelen) {
                f = f / scaling.factor;
            } else if (wavelen >= high_wavelen) {
                const double smooth = (scaling.orig_max_seq_len / wavelen - scaling.low_freq_factor) /
                                      (scaling.high_freq_factor - scaling.low_freq_factor);
                f = (1.0 - smooth) * f / scaling.factor + smooth * f;
            }
        }
        inv_freq[i] = f;
    }
    for (int p = 0; p < max_seq_len; p++) {
        for (int i = 0; i < half_; i++) {
            const double a = p * inv_freq[i];
            cos_[(size_t)p * half_ + i] = (float)std::cos(a);
            sin_[(size_t)p * half_ + i] = (float)std::sin(a);
        }
    }
}

void RopeTable::apply(float* x, int n_heads, int pos, RopeStyle style) const {
    const float* c = &cos_[(size_t)pos * half_];
    const float* s = &sin_[(size_t)pos * half_];
    for (int h = 0; h < n_heads; h++) {
        float* v = x + (size_t)h * half_ * 2;
        for (int i = 0; i < half_; i++) {
            // interleaved rotates pairs (2i, 2i+1); rotate-half rotates (i, i + head_dim/2)
            const int a = style == RopeStyle::Interleaved ? 2 * i : i;
            const int b = style == RopeStyle::Interleaved ? 2 * i + 1 : i + half_;
            const float x0 = v[a], x1 = v[b];
            v[a] = x0 * c[i] - x1 * s[i];
            v[b] = x0 * s[i] + x1 * c[i];
        }
    }
}

}  // namespace dllama
