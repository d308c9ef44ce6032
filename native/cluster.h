// One forward step across the nodes of a cluster: the root sends every worker the step and its
// tokens (every node holds the embedding: token ids cost 4 bytes where embedded rows would cost
// dim floats), all nodes run their slices with a mesh all-reduce after attention and after the
// feed-forward block, and each node answers with its slice of the output.
//
//  root -> worker, per step        | StepHeader (20 bytes) | tokens: n_tokens x int32 |
//  every node <-> every node        | partial sums: n_tokens x dim, Q80 blocks or float32 |  x 2 per layer
//  worker -> root, per step         | nothing | vocab slice float32 | TopK (520 bytes) |
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
    int32_t pos;
    int32_t n_tokens;
    int32_t output;  // StepOutput
    float temperature;  // for the TopK normaliser
};
static_assert(sizeof(StepHeader) == 20, "step header is 20 bytes on the wire");

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
// so all of them hold bit-identical residuals afterwards.
class MeshAllReduce : public AllReduce {
public:
    MeshAllReduce(Mesh& mesh, bool q80, int max_batch, int dim);
    void sum(float* x, int batch, int dim) override;

private:
    Mesh& mesh_;
    bool q80_;
    std::vector<uint8_t> out_, in_;
    std::vector<float> row_;
};

class ClusterRoot {
public:
    ClusterRoot(Transformer& model, Mesh& mesh, bool q80, std::vector<int> worker_vocab);
    // Runs tokens at pos on every node. Logits: `logits` receives the full vocabulary.
    // TopK: `parts` receives one entry per node (node order), each checked: a worker's bad reply
    // is a NetError naming it. temperature: finite and >= 0 (0: greedy).
    void step(const int* tokens, int n, int pos, StepOutput output, float temperature, float* logits,
              std::vector<TopK>* parts);
    void stop();

private:
    Transformer& model_;
    Mesh& mesh_;
    MeshAllReduce all_reduce_;
    std::vector<int> worker_vocab_;  // vocab slice size of each node
    std::vector<int> vocab_begin_;  // first vocab id of each node's slice (slices follow node order)
    std::vector<float> local_;
};

// A worker's loop: steps from the root until it stops or a peer fails. Returns why it ended.
std::string serve_worker(Transformer& model, Mesh& mesh, bool q80);

}  // namespace dllama
