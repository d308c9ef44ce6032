#include "model.h"

#include <cstdlib>
#include <stdexcept>

namespace dllama {

SlicePlan SlicePlan::whole(const ModelConfig& c) {
    SlicePlan p;
    p.q_head_end = c.n_heads;
    p.kv_head_end = c.n_kv_heads;
    p.ffn_end = c.hidden_dim;
    p.moe_end = c.moe_hidden_dim;
    p.vocab_end = c.vocab_size;
    return p;
}

std::vector<std::string> tensor_names(const ModelConfig& c) {
    std::vector<std::string> names{"embed_tokens"};
    for (int l = 0; l < c.n_layers; l++) {
        const std::string p = "layers." + std::to_string(l) + ".";
        for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj"}) names.push_back(p + n);
        if (c.is_moe()) {
            names.push_back(p + "router");
            for (int e = 0; e < c.n_experts; e++) {
                const std::string pe = p + "experts." + std::to_string(e) + ".";
                for (const char* n : {"gate_proj", "down_proj", "up_proj"}) names.push_back(pe + n);
            }
        } else {
            for (const char* n : {"gate_proj", "down_proj", "up_proj"}) names.push_back(p + n);
        }
        if (c.has_qk_norm()) {
            names.push_back(p + "q_norm");
            names.push_back(p + "k_norm");
        }
        names.push_back(p + "input_layernorm");
        names.push_back(p + "post_attention_layernorm");
    }
    names.push_back("norm");
    names.push_back("lm_head");
    return names;
}

namespace {

// Reads a decimal index followed by '.', advancing s; -1 when there is none.
int take_index(const char*& s) {
    char* end = nullptr;
    const long v = std::strtol(s, &end, 10);
    if (end == s || *end != '.' || v < 0 || v > 1 << 20) return -1;
    s = end + 1;
    return (int)v;
}

[[noreturn]] void unknown(const std::string& name) {
    throw std::invalid_argument("unknown tensor name '" + name + "' for this model");
}

}  // namespace

TensorSlot find_tensor_slot(Weights& w, const ModelConfig& c, const SlicePlan& p,
                            const std::string& name) {
    const FloatType mat = c.weight_type, f32 = FloatType::F32;
    if (name == "embed_tokens") return {&w.embedding, c.vocab_size, c.dim, f32};
    if (name == "norm") return {&w.final_norm, 1, c.dim, f32};
    if (name == "lm_head") return {&w.lm_head, p.vocab(), c.dim, mat};

    const char* s = name.c_str();
    if (name.rfind("layers.", 0) != 0) unknown(name);
    s += 7;
    const int l = take_index(s);
    if (l < 0 || l >= c.n_layers) unknown(name);
    LayerWeights& L = w.layers[l];
    const std::string rest = s;
    const int q = p.q_heads() * c.head_dim, kv = p.kv_heads() * c.head_dim;
    if (rest == "q_proj") return {&L.wq, q, c.dim, mat};
    if (rest == "k_proj") return {&L.wk, kv, c.dim, mat};
    if (rest == "v_proj") return {&L.wv, kv, c.dim, mat};
    if (rest == "o_proj") return {&L.wo, c.dim, q, mat};
    if (rest == "input_layernorm") return {&L.attn_norm, 1, c.dim, f32};
    if (rest == "post_attention_layernorm") return {&L.ffn_norm, 1, c.dim, f32};
    if (c.has_qk_norm() && rest == "q_norm") return {&L.q_norm, 1, c.head_dim, f32};
    if (c.has_qk_norm() && rest == "k_norm") return {&L.k_norm, 1, c.head_dim, f32};
    if (!c.is_moe()) {
        if (rest == "gate_proj") return {&L.gate, p.ffn(), c.dim, mat};
        if (rest == "down_proj") return {&L.down, c.dim, p.ffn(), mat};
        if (rest == "up_proj") return {&L.up, p.ffn(), c.dim, mat};
        unknown(name);
    }
    if (rest == "router") return {&L.router, c.n_experts, c.dim, f32};
    if (rest.rfind("experts.", 0) != 0) unknown(name);
    s += 8;
    const int e = take_index(s);
    if (e < 0 || e >= c.n_experts) unknown(name);
    ExpertWeights& E = L.experts[e];
    const std::string part = s;
    if (part == "gate_proj") return {&E.gate, p.moe(), c.dim, mat};
    if (part == "down_proj") return {&E.down, c.dim, p.moe(), mat};
    if (part == "up_proj") return {&E.up, p.moe(), c.dim, mat};
    unknown(name);
}

}  // namespace dllama
