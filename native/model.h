// What one node holds: the model's shape, the slice of it this node owns, and its weights.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "ops.h"
#include "quant.h"

namespace dllama {

enum class Arch : int32_t { Llama = 0x00ABCD00, Qwen3 = 0x00ABCD01, Qwen3Moe = 0x00ABCD02 };

struct ModelConfig {
    Arch arch = Arch::Llama;
    int dim = 0;
    int hidden_dim = 0;  // dense FFN
    int n_layers = 0;
    int n_heads = 0;
    int n_kv_heads = 0;
    int head_dim = 0;
    int n_experts = 0;  // 0 for dense
    int n_active_experts = 0;
    int moe_hidden_dim = 0;
    int vocab_size = 0;
    // The tokenizer's vocabulary when the LM head has padding rows past it (0: none): those rows'
    // logits are -inf on every node, so no output (logits, top-k, argmax) ever offers them.
    int vocab_limit = 0;
    double rope_theta = 10000;
    RopeStyle rope_style = RopeStyle::Interleaved;
    RopeTable::Scaling rope_scaling;
    float norm_eps = 1e-5f;
    FloatType weight_type = FloatType::Q40;

    bool is_moe() const { return arch == Arch::Qwen3Moe; }
    bool has_qk_norm() const { return arch == Arch::Qwen3 || arch == Arch::Qwen3Moe; }
};

// The part of every sharded dimension this node owns, as half-open ranges. A single node owns
// everything. Computed once (by the cluster's planner); the forward pass only reads it.
struct SlicePlan {
    int q_head_begin = 0, q_head_end = 0;    // query heads
    int kv_head_begin = 0, kv_head_end = 0;  // the kv heads those query heads read
    int ffn_begin = 0, ffn_end = 0;          // dense FFN hidden rows
    int moe_begin = 0, moe_end = 0;          // hidden rows of every expert
    int vocab_begin = 0, vocab_end = 0;      // LM head rows

    static SlicePlan whole(const ModelConfig& c);
    int q_heads() const { return q_head_end - q_head_begin; }
    int kv_heads() const { return kv_head_end - kv_head_begin; }
    int ffn() const { return ffn_end - ffn_begin; }
    int moe() const { return moe_end - moe_begin; }
    int vocab() const { return vocab_end - vocab_begin; }
};

// Throws std::invalid_argument unless every range lies within the model's dimension, the ranges
// this model computes over (query heads, vocab, and the dense FFN's or the experts' hidden rows)
// are non-empty, and the kv heads are exactly those the query heads read.
void check_plan(const ModelConfig& c, const SlicePlan& p);

// A matrix [rows, cols] (or a vector: rows 1). F32 tensors stay in memory the node does not own
// (a memory-mapped model file, or a buffer of received slices); row_stride is in bytes, wider
// than the row when the tensor is a column slice of a bigger matrix read in place. Q40 matrices
// are copied at bind time into the node's own memory in the packed order of repack.h (packed
// set, row_stride and row() meaningless).
struct Tensor {
    const uint8_t* data = nullptr;
    FloatType type = FloatType::F32;
    int rows = 0, cols = 0;
    size_t row_stride = 0;
    bool packed = false;

    const float* f32() const { return reinterpret_cast<const float*>(data); }
    const uint8_t* row(int r) const { return data + (size_t)r * row_stride; }
};

struct ExpertWeights {
    Tensor gate;  // w1 [moe slice, dim]
    Tensor down;  // w2 [dim, moe slice]
    Tensor up;    // w3 [moe slice, dim]
};

struct LayerWeights {
    Tensor attn_norm;  // [dim]
    Tensor wq;         // [q heads slice * head_dim, dim]
    Tensor wk;         // [kv heads slice * head_dim, dim]
    Tensor wv;         // [kv heads slice * head_dim, dim]
    Tensor q_norm;     // [head_dim]   qwen3 only
    Tensor k_norm;     // [head_dim]   qwen3 only
    Tensor wo;         // [dim, q heads slice * head_dim]
    Tensor ffn_norm;   // [dim]
    Tensor gate;       // dense w1 [ffn slice, dim]
    Tensor down;       // dense w2 [dim, ffn slice]
    Tensor up;         // dense w3 [ffn slice, dim]
    Tensor router;     // moe [n_experts, dim], F32
    std::vector<ExpertWeights> experts;  // moe [n_experts]
};

struct Weights {
    Tensor embedding;   // [vocab, dim], F32
    std::vector<LayerWeights> layers;
    Tensor final_norm;  // [dim]
    Tensor lm_head;     // [vocab slice, dim]
};

// Every weight the forward pass reads, by kind: engine/dllama/tensors.py's table names each one
// (its .m name, shape, storage and how the cluster cuts it) by these names, and the engine binds a
// weight by its kind, layer and expert. X(enumerator, name as _core.TensorKind)
#define DLLAMA_TENSOR_KINDS(X)                                                                       \
    X(Embedding, "EMBEDDING") X(Wq, "WQ") X(Wk, "WK") X(Wv, "WV") X(Wo, "WO") X(Gate, "GATE")         \
    X(Down, "DOWN") X(Up, "UP") X(Router, "ROUTER") X(ExpertGate, "EXPERT_GATE")                    \
    X(ExpertDown, "EXPERT_DOWN") X(ExpertUp, "EXPERT_UP") X(QNorm, "Q_NORM") X(KNorm, "K_NORM")     \
    X(AttnNorm, "ATTN_NORM") X(FfnNorm, "FFN_NORM") X(FinalNorm, "FINAL_NORM") X(LmHead, "LM_HEAD")

#define DLLAMA_ENUMERATOR(e, name) e,
enum class TensorKind : int32_t { DLLAMA_TENSOR_KINDS(DLLAMA_ENUMERATOR) Count };
#undef DLLAMA_ENUMERATOR
const char* tensor_kind_name(TensorKind kind);

// Where the forward pass keeps a weight and the [rows, cols] and type it multiplies it at: the
// widths of this node's buffers. tensor is null when this model's forward pass does not read the
// kind (q_norm in Llama, the experts in a dense model). Throws std::invalid_argument for a kind,
// layer or expert out of range.
struct TensorSlot {
    Tensor* tensor;
    int rows, cols;
    FloatType type;
};
TensorSlot find_tensor_slot(Weights& weights, const ModelConfig& config, const SlicePlan& plan, TensorKind kind,
                            int layer, int expert);

}  // namespace dllama
