// One forward step across the nodes of a cluster: the root sends every worker the step (one
// entry per sequence it advances) and its tokens (every node holds the embedding: token ids cost
// 4 bytes where embedded rows would cost dim floats), all nodes run their slices with a mesh
// all-reduce after attention and after the feed-forward block (every token of the step in one
// exchange), and each node answers for every entry that asks: its slice of the logits or its
// top-k, in entry order, in one message.
//
//  root -> worker, per step   | StepHeader (16 bytes) |
//                             | n_entries x WireEntry (20 bytes) | n_tokens x int32 |
//  every node <-> every node  | partial sums: n_tokens x dim, Q80 blocks or float32 |  x 2 per layer
//  worker -> root, per step   | per entry: nothing | vocab slice float32 | TopK (520 bytes) |
//
// With cluster keys, each of these messages is followed by its 16-byte tag (net.h, mac.h).
// Everything read off the mesh is checked before use: a worker checks the step header, the
// root every top-k reply (ClusterRoot::step).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "forward.h"
#include "net.h"

namespace dllama {

constexpr uint32_t kStepMagic = 0x5354504Cu;  // "LPTS"
constexpr int kTopK = 64;

enum class StepOutput : int32_t { None = 0, Logits = 1, TopK = 2, Stop = 3 };

struct StepHeader {
    uint32_t magic;
    int32_t stop;       // 1: the session ends (nothing follows)
    int32_t n_entries;  // 1 .. the node's max_sequences
    int32_t n_tokens;   // the entries' tokens, end to end
};
static_assert(sizeof(StepHeader) == 16, "step header is 16 bytes on the wire");

struct WireEntry {
    int32_t seq, pos, n_tokens;
    int32_t output;     // StepOutput: None, Logits or TopK
    float temperature;  // for the TopK normaliser
};
static_assert(sizeof(WireEntry) == 20, "a step entry is 20 bytes on the wire");

// One entry of a step as the root takes it.
struct RootEntry {
    StepEntry at;
    StepOutput output;
    float temperature;  // finite, >= 0 (0: greedy; the normaliser then uses 1)
};

// A node's best candidates over its vocab slice and log(sum(exp(logit / T))) over the slice.
struct TopK {
    int32_t ids[kTopK];
    float logits[kTopK];
    float log_norm;
    int32_t count;
};
static_assert(sizeof(TopK) == 8 * kTopK + 8, "top-k reply is 520 bytes on the wire");

// Candidates sorted by logit, larger first, ties to the smaller id.
TopK top_k(const float* logits, int n, int id_offset, float temperature);

// Sums the nodes' partials through the mesh. Every node adds the same values in node order,
// so all of them hold bit-identical residuals afterwards. A one-token partial is taken in
// pieces of kAllReducePieces (ready): each piece's bytes leave while the matmul producing the
// next runs, so only the last piece's are on the wire after it ends. The message is the same
// bytes either way (a token's row is contiguous), so nodes need not agree on the pieces.
constexpr int kAllReducePieces = 4;

class MeshAllReduce : public AllReduce {
public:
    MeshAllReduce(Mesh& mesh, bool q80, int max_batch, int dim);
    int piece(int batch, int dim) const override;
    void ready(const float* x, int batch, int dim, int end) override;
    void sum(float* x, int batch, int dim) override;

private:
    size_t row_bytes(int columns) const;
    // Encodes columns [handed_, end) of x into out_ (Q80 or F32) and offers them to the mesh,
    // opening the exchange at the first piece.
    void hand_over(const float* x, int batch, int dim, int end);

    Mesh& mesh_;
    bool q80_;
    std::vector<uint8_t> out_, in_;
    std::vector<float> row_;
    bool started_ = false;  // an exchange is open: columns [0, handed_) are out_'s
    int handed_ = 0;
};

// What one node (or, through ClusterRoot, the cluster) answers for a step's entries: per
// entry with output Logits its row of `logits` (whole vocabulary), per TopK entry its `parts`
// (one per node, node order). Rows and parts follow entry order.
struct StepResult {
    std::vector<float> logits;               // [Logits entries, vocab]
    std::vector<std::vector<TopK>> parts;    // [TopK entries][nodes]
};

// A single node's step: its forward pass, then the same outputs a cluster gives (one part).
void local_step(Transformer& model, const std::vector<RootEntry>& entries, const int* tokens, StepResult& out);

// Throws std::invalid_argument for an output or temperature a step must not carry.
void check_outputs(const std::vector<RootEntry>& entries);

class ClusterRoot {
public:
    ClusterRoot(Transformer& model, Mesh& mesh, bool q80, std::vector<int> worker_vocab);
    // Runs the entries on every node. A bad entry is std::invalid_argument before any worker
    // hears of the step; a worker's malformed reply (each top-k checked) is a NetError naming it.
    void step(const std::vector<RootEntry>& entries, const int* tokens, StepResult& out);
    void stop();

private:
    Transformer& model_;
    Mesh& mesh_;
    MeshAllReduce all_reduce_;
    std::vector<int> worker_vocab_;  // vocab slice size of each node
    std::vector<int> vocab_begin_;  // first vocab id of each node's slice (slices follow node order)
    std::vector<float> local_;      // this node's output rows
    std::vector<uint8_t> reply_;    // one worker's answer
};

// A worker's loop: steps from the root until it stops or a peer fails. Returns why it ended.
std::string serve_worker(Transformer& model, Mesh& mesh, bool q80);

}  // namespace dllama
