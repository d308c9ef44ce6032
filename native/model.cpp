#include "model.h"

#include <string>
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

void check_plan(const ModelConfig& c, const SlicePlan& p) {
    auto range = [](const char* what, int begin, int end, int limit, bool used) {
        if (begin < 0 || end < begin || end > limit || (used && begin == end))
            throw std::invalid_argument(std::string("slice plan: bad range for ") + what + " [" + std::to_string(begin) +
                                        ", " + std::to_string(end) + ") of " + std::to_string(limit));
    };
    range("q_heads", p.q_head_begin, p.q_head_end, c.n_heads, true);
    range("kv_heads", p.kv_head_begin, p.kv_head_end, c.n_kv_heads, true);
    range("ffn", p.ffn_begin, p.ffn_end, c.hidden_dim, !c.is_moe());
    range("moe", p.moe_begin, p.moe_end, c.moe_hidden_dim, c.is_moe());
    range("vocab", p.vocab_begin, p.vocab_end, c.vocab_size, true);
    const int group = c.n_heads / c.n_kv_heads;
    if (p.kv_head_begin != p.q_head_begin / group || p.kv_head_end != (p.q_head_end - 1) / group + 1)
        throw std::invalid_argument("slice plan: kv heads must be exactly those its query heads read");
}

const char* tensor_kind_name(TensorKind kind) {
#define DLLAMA_NAME(e, name) name,
    static const char* const names[] = {DLLAMA_TENSOR_KINDS(DLLAMA_NAME)};
#undef DLLAMA_NAME
    const int k = (int)kind;
    return k >= 0 && k < (int)TensorKind::Count ? names[k] : "?";
}

TensorSlot find_tensor_slot(Weights& w, const ModelConfig& c, const SlicePlan& p, TensorKind kind, int layer,
                            int expert) {
    const FloatType mat = c.weight_type, f32 = FloatType::F32;
    const int q = p.q_heads() * c.head_dim, kv = p.kv_heads() * c.head_dim;
    const int ffn = c.is_moe() ? 0 : p.ffn(), moe = c.is_moe() ? p.moe() : 0;
    auto in_layer = [&]() -> LayerWeights& {
        if (layer < 0 || layer >= c.n_layers)
            throw std::invalid_argument("layer " + std::to_string(layer) + " is not in 0.." +
                                        std::to_string(c.n_layers - 1));
        return w.layers[layer];
    };
    auto in_expert = [&]() -> ExpertWeights& {
        LayerWeights& L = in_layer();
        if (expert < 0 || expert >= c.n_experts)
            throw std::invalid_argument("expert " + std::to_string(expert) + " is not in 0.." +
                                        std::to_string(c.n_experts - 1));
        return L.experts[expert];
    };
    const TensorSlot unread{nullptr, 0, 0, f32};
    switch (kind) {
        case TensorKind::Embedding: return {&w.embedding, c.vocab_size, c.dim, f32};
        case TensorKind::Wq: return {&in_layer().wq, q, c.dim, mat};
        case TensorKind::Wk: return {&in_layer().wk, kv, c.dim, mat};
        case TensorKind::Wv: return {&in_layer().wv, kv, c.dim, mat};
        case TensorKind::Wo: return {&in_layer().wo, c.dim, q, mat};
        case TensorKind::Gate: return c.is_moe() ? unread : TensorSlot{&in_layer().gate, ffn, c.dim, mat};
        case TensorKind::Down: return c.is_moe() ? unread : TensorSlot{&in_layer().down, c.dim, ffn, mat};
        case TensorKind::Up: return c.is_moe() ? unread : TensorSlot{&in_layer().up, ffn, c.dim, mat};
        case TensorKind::Router: return c.is_moe() ? TensorSlot{&in_layer().router, c.n_experts, c.dim, f32} : unread;
        case TensorKind::ExpertGate: return c.is_moe() ? TensorSlot{&in_expert().gate, moe, c.dim, mat} : unread;
        case TensorKind::ExpertDown: return c.is_moe() ? TensorSlot{&in_expert().down, c.dim, moe, mat} : unread;
        case TensorKind::ExpertUp: return c.is_moe() ? TensorSlot{&in_expert().up, moe, c.dim, mat} : unread;
        case TensorKind::QNorm: return c.has_qk_norm() ? TensorSlot{&in_layer().q_norm, 1, c.head_dim, f32} : unread;
        case TensorKind::KNorm: return c.has_qk_norm() ? TensorSlot{&in_layer().k_norm, 1, c.head_dim, f32} : unread;
        case TensorKind::AttnNorm: return {&in_layer().attn_norm, 1, c.dim, f32};
        case TensorKind::FfnNorm: return {&in_layer().ffn_norm, 1, c.dim, f32};
        case TensorKind::FinalNorm: return {&w.final_norm, 1, c.dim, f32};
        case TensorKind::LmHead: return {&w.lm_head, p.vocab(), c.dim, mat};
        case TensorKind::Count: break;
    }
    throw std::invalid_argument("unknown tensor kind " + std::to_string((int)kind));
}

}  // namespace dllama
