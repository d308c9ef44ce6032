// The per-node forward pass of Llama 3, Qwen3 and Qwen3 MoE over this node's slice.
#pragma once
#include <map>
#include <memory>
#include <vector>

#include "model.h"
#include "repack.h"
#include "thread_pool.h"

namespace dllama {

// The cluster's hook: sums a [batch, dim] buffer of partial results across all nodes, in
// place. A single node has none. The producer of a one-token partial may finish it `piece`
// columns at a time and hand each piece over as it is done (ready, columns [0, end) final,
// end growing), so the sum's traffic starts while the rest is computed; then sum.
class AllReduce {
public:
    virtual ~AllReduce() = default;
    // a multiple of 32 columns, or dim: the whole partial at once
    virtual int piece(int /*batch*/, int dim) const { return dim; }
    virtual void ready(const float* /*x*/, int /*batch*/, int /*dim*/, int /*end*/) {}
    virtual void sum(float* x, int batch, int dim) = 0;
};

// Sequences one KV cache holds at most: a bound on what a root may ask a worker to allocate
// before its memory check, far above what boards serve at once.
constexpr int kMaxSequences = 256;

// One sequence's part of a step: n tokens at positions pos .. pos+n-1 of sequence seq.
struct StepEntry {
    int seq, pos, n;
};

class Transformer {
public:
    // The KV cache holds max_sequences sequences of max_seq_len positions each, allocated here,
    // in kv_type (F32 or F16). max_batch bounds how many tokens go through the layers together;
    // a step with more runs in chunks of it.
    Transformer(const ModelConfig& config, const SlicePlan& plan, int n_threads, int max_seq_len,
                int max_batch, int max_sequences = 1, FloatType kv_type = FloatType::F32);

    // Points an F32 weight at memory the caller keeps alive; copies a Q40 one into packed
    // memory of its own (repack.h), so the caller's copy is no longer read. layer and expert
    // matter where the kind has them. Throws std::invalid_argument when this model has no such
    // weight or the shape or type is not what this node's forward pass multiplies it at.
    void bind(TensorKind kind, int layer, int expert, const uint8_t* data, int rows, int cols, size_t row_stride,
              FloatType type);
    // Throws std::invalid_argument naming the first weight not bound yet.
    void check_bound() const;
    void set_all_reduce(AllReduce* all_reduce) { all_reduce_ = all_reduce; }

    // Runs every entry's tokens (end to end in `tokens`) in one pass: each weight read once per
    // chunk of max_batch tokens, each token's attention over its own sequence's cache (which
    // holds every earlier position of it). For each entry with wants[e], `logits` receives its
    // last token's logits over this node's vocab slice, one row per such entry, in entry order.
    void forward(const StepEntry* entries, int n_entries, const int* tokens, const bool* wants, float* logits);
    // One sequence: n tokens at pos of sequence seq, the last token's logits when logits is set.
    void forward(const int* tokens, int n, int pos, float* logits, int seq = 0);
    // Throws std::invalid_argument for a step forward would refuse (before anything changes):
    // no entries, a sequence out of range or twice, a position range outside the context, a
    // token outside the vocabulary.
    void check_step(const StepEntry* entries, int n_entries, const int* tokens) const;

    const ModelConfig& config() const { return config_; }
    const SlicePlan& plan() const { return plan_; }
    int max_seq_len() const { return max_seq_len_; }
    int max_batch() const { return max_batch_; }
    int max_sequences() const { return max_sequences_; }
    FloatType kv_type() const { return kv_type_; }
    int n_threads() const { return pool_.size(); }

private:
    struct MatmulJob {
        const Tensor* w;
        float* y;        // [batch, w->rows]
        const void* x;   // [batch, w->cols]: Q80 blocks for Q40 weights, F32 otherwise
        int batch;
        int r0 = 0, r1 = -1;  // the output rows computed (-1: to the last); r0 a multiple of 8
        int rows() const { return (r1 < 0 ? w->rows : r1) - r0; }
    };
    void run_matmuls(const MatmulJob* jobs, int n_jobs);
    // thread t's share (of nt) of run_matmuls' work
    static void matmul_share(const MatmulJob* jobs, int n_jobs, int t, int nt);
    // The activation a matmul over a weight of the model's type reads: F32 rows for F32
    // weights, their Q80 copy (made here, in parallel) for Q40 weights.
    const void* matmul_input(const float* x, BlockQ80* xq, int rows, int cols);

    void embed(const int* tokens, int n, float* x) const;
    // x_ holds n rows, token b of sequence tok_seq_[b] at position tok_pos_[b]; the rows listed
    // in out_rows get the final norm and the LM head, into logits (one row each)
    void forward_chunk(int n, const std::vector<int>& out_rows, float* logits);
    void attention(int layer, int n);
    // where layer l keeps the key (or value) of sequence s at position p
    uint8_t* kv_at(std::vector<uint8_t>& cache, int s, int p) const {
        return cache.data() + ((size_t)s * max_seq_len_ + p) * kv_row_bytes_;
    }
    void dense_ffn(int layer, int n);
    void moe_ffn(int layer, int n);
    // moe_ffn's steps
    void route(const LayerWeights& L, int n, std::vector<int>& count);
    std::vector<int> group_by_expert(int n, const std::vector<int>& count);
    std::vector<MatmulJob> run_gate_up(const LayerWeights& L, int n, const std::vector<int>& count,
                                       const std::vector<int>& offset);
    // (in the pool's threads when a token's partial goes in pieces: n = 1 then, and it runs inline)
    void combine_experts(int n, int c0, int c1);
    // part_'s n rows: the jobs (their rows are part_'s columns), then finish(c0, c1) over the
    // columns, in the pieces the all-reduce asks for (each handed to it once finished), then
    // summed across the nodes
    template <typename Finish>
    void project_and_sync(const MatmulJob* jobs, int n_jobs, int n, Finish&& finish);

    ModelConfig config_;
    SlicePlan plan_;
    int max_seq_len_, max_batch_, max_sequences_;
    FloatType kv_type_;
    size_t kv_row_bytes_;  // one position's keys (or values) of this node's kv heads
    ThreadPool pool_;
    RopeTable rope_;
    Weights weights_;
    std::map<const Tensor*, AlignedBytes> packed_;  // the Q40 matrices, by the weight they fill
    AllReduce* all_reduce_ = nullptr;

    // sizes of this node's slices
    int q_dim_, kv_dim_, ffn_dim_, moe_dim_;

    // activations, B = max_batch
    std::vector<float> x_;         // [B, dim] residual stream, full on every node
    std::vector<float> xb_;        // [B, dim] normalised input of a block
    std::vector<BlockQ80> xq_;     // [B, dim / 32]
    std::vector<float> q_;         // [B, q_dim]
    std::vector<float> k_;         // [B, kv_dim]
    std::vector<float> v_;         // [B, kv_dim]
    std::vector<float> att_;       // [B, q_dim] attention output of this node's heads
    std::vector<BlockQ80> attq_;   // [B, q_dim / 32]
    std::vector<float> part_;      // [B, dim] this node's partial sum of a block's output
    std::vector<float> scores_;    // [threads, max_seq_len] attention scores
    std::vector<float> h1_, h3_;   // [B * k, ffn or moe slice] gate and up outputs
    std::vector<BlockQ80> hq_;     // [B * k, slice / 32]
    std::vector<float> router_;    // [B, n_experts]
    std::vector<float> gx_;        // [B * k, dim] rows of xb gathered by expert (F32 weights)
    std::vector<BlockQ80> gxq_;    // [B * k, dim / 32] the same for Q40 weights
    std::vector<float> eout_;      // [B * k, dim] expert outputs, grouped by expert
    std::vector<int> route_expert_;    // [B * k] expert of each (token, choice)
    std::vector<float> route_weight_;  // [B * k] its renormalised router probability
    std::vector<int> route_slot_;      // [B * k] its row in the grouped buffers
    std::vector<int> tok_seq_, tok_pos_;  // [B] each row's sequence and position
    std::vector<float> final_;     // [min(B, max_sequences), dim] output rows after the final norm
    std::vector<BlockQ80> finalq_; // [min(B, max_sequences), dim / 32]

    // KV cache per layer: [max_sequences, max_seq_len, kv_dim] of F32 or F16
    std::vector<std::vector<uint8_t>> key_cache_, value_cache_;
};

}  // namespace dllama
