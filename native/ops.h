// Small per-row operations of the forward pass. They are cheap next to the matmuls, so they
// are portable C++ (vectorised by the compiler); the dot products inside attention go through
// the kernel table.
#pragma once
#include <vector>

namespace dllama {

// y = x / rms(x) * w, over n values (x and y may alias).
void rmsnorm(float* y, const float* x, const float* w, int n, float eps);

void softmax(float* x, int n);

// y = silu(g) * u, elementwise.
void silu_mul(float* y, const float* g, const float* u, int n);

enum class RopeStyle { Interleaved, RotateHalf };

// cos/sin of every (position, frequency) pair, computed once per model.
class RopeTable {
public:
    struct Scaling {  // llama3 frequency scaling; factor 0 = none
        float factor = 0, low_freq_factor = 0, high_freq_factor = 0;
        int orig_max_seq_len = 0;
    };
    RopeTable(int head_dim, int max_seq_len, double theta, Scaling scaling);
    // Rotates n_heads heads of head_dim values each, laid out one after another, at pos.
    void apply(float* x, int n_heads, int pos, RopeStyle style) const;

private:
    int half_;
    std::vector<float> cos_, sin_;  // [max_seq_len, head_dim / 2]
};

}  // namespace dllama
