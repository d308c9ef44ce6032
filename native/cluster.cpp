#include "cluster.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>

#include "kernels.h"

namespace dllama {

TopK top_k(const float* logits, int n, int id_offset, float temperature) {
    TopK out{};
    const int k = std::min(kTopK, n);
    std::vector<int> order(n);
    for (int i = 0; i < n; i++) order[i] = i;
    auto better = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
    std::partial_sort(order.begin(), order.begin() + k, order.end(), better);
    for (int i = 0; i < k; i++) {
        out.ids[i] = order[i] + id_offset;
        out.logits[i] = logits[order[i]];
    }
    out.count = k;
    // log-sum-exp of logits / T over the slice, from its largest term (float exp, double sum:
    // as the Python sampler computes it for one node)
    const float t = temperature > 0 ? temperature : 1.0f;
    const float top = logits[order[0]] / t;
    if (top == -INFINITY) {  // a slice of padding rows only (vocab_limit): it adds nothing
        out.log_norm = -INFINITY;
        return out;
    }
    double sum = 0;
    for (int i = 0; i < n; i++) sum += std::exp(logits[i] / t - top);
    out.log_norm = top + (float)std::log(sum);
    return out;
}

namespace {

bool temperature_in_range(float t) { return std::isfinite(t) && t >= 0; }

// What makes a worker's top-k reply unusable ("" if nothing): the root copies `count` entries and
// the sampler takes the ids as tokens, so each must be what a node with that slice sends. -inf
// is a masked logit (and -inf log_norm a fully masked slice); NaN and +inf are never sent.
std::string top_k_problem(const TopK& t, int vocab_begin, int vocab_size) {
    const int expected = std::min(kTopK, vocab_size);
    if (t.count != expected)
        return "count " + std::to_string(t.count) + " where its slice gives " + std::to_string(expected);
    auto bad = [](float x) { return std::isnan(x) || x == INFINITY; };
    for (int i = 0; i < t.count; i++) {
        if (t.ids[i] < vocab_begin || t.ids[i] - vocab_begin >= vocab_size)
            return "id " + std::to_string(t.ids[i]) + " outside its vocab slice [" + std::to_string(vocab_begin) + ", " +
                   std::to_string((int64_t)vocab_begin + vocab_size) + ")";
        if (bad(t.logits[i])) return "logit " + std::to_string(i) + " is NaN or +inf";
    }
    if (bad(t.log_norm)) return "log_norm is NaN or +inf";
    return "";
}

}  // namespace

MeshAllReduce::MeshAllReduce(Mesh& mesh, bool q80, int max_batch, int dim) : mesh_(mesh), q80_(q80) {
    out_.resize((size_t)max_batch * row_bytes(dim));
    in_.resize((size_t)max_batch * row_bytes(dim) * mesh.size());
    row_.resize(dim);
}

size_t MeshAllReduce::row_bytes(int columns) const {
    return q80_ ? (size_t)columns / kBlockSize * sizeof(BlockQ80) : (size_t)columns * sizeof(float);
}

int MeshAllReduce::piece(int batch, int dim) const {
    // more tokens: their rows interleave the pieces, so no prefix of the message is complete
    // before the last piece is; a piece is whole Q80 blocks
    if (batch != 1 || dim % kBlockSize != 0) return dim;
    const int blocks = dim / kBlockSize;
    return (blocks + kAllReducePieces - 1) / kAllReducePieces * kBlockSize;
}

void MeshAllReduce::hand_over(const float* x, int batch, int dim, int end) {
    if (!started_) {
        mesh_.begin_exchange(out_.data(), in_.data(), row_bytes(dim) * batch);
        started_ = true;
        handed_ = 0;
    }
    if (end <= handed_ || end > dim || (end != dim && (batch != 1 || end % kBlockSize != 0)))
        throw std::logic_error("all-reduce: pieces must grow in whole blocks of a one-token partial");
    const Kernels& kern = kernels();
    const size_t row = row_bytes(dim);
    for (int b = 0; b < batch; b++) {
        const float* from = x + (size_t)b * dim + handed_;
        uint8_t* to = out_.data() + b * row + row_bytes(handed_);
        if (q80_) kern.quantize_row_q80(from, reinterpret_cast<BlockQ80*>(to), end - handed_);
        else std::memcpy(to, from, (end - handed_) * sizeof(float));
    }
    // a one-token message ends with the columns handed so far; more tokens come in one piece
    handed_ = end;
    mesh_.offer(batch == 1 ? row_bytes(end) : row * batch);
}

void MeshAllReduce::ready(const float* x, int batch, int dim, int end) {
    const auto start = std::chrono::steady_clock::now();
    try {
        hand_over(x, batch, dim, end);
    } catch (...) {
        started_ = false;  // the exchange is dead with the session; never continue it
        throw;
    }
    mesh_.stats.sync_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void MeshAllReduce::sum(float* x, int batch, int dim) {
    const auto start = std::chrono::steady_clock::now();
    const Kernels& kern = kernels();
    const size_t row = row_bytes(dim);
    const size_t bytes = row * batch;
    try {
        if (!started_ || handed_ < dim) hand_over(x, batch, dim, dim);
    } catch (...) {
        started_ = false;
        throw;
    }
    started_ = false;
    // this node's own part goes where a peer's would, so the sum below is the same everywhere
    std::memcpy(in_.data() + (size_t)mesh_.node() * bytes, out_.data(), bytes);
    mesh_.finish_exchange();
    for (int b = 0; b < batch; b++) {
        float* y = x + (size_t)b * dim;
        std::memset(y, 0, dim * sizeof(float));
        for (int p = 0; p < mesh_.size(); p++) {
            const uint8_t* part = in_.data() + (size_t)p * bytes + b * row;
            if (q80_) {
                kern.dequantize_row_q80(reinterpret_cast<const BlockQ80*>(part), row_.data(), dim);
                for (int i = 0; i < dim; i++) y[i] += row_[i];
            } else {
                const float* f = reinterpret_cast<const float*>(part);
                for (int i = 0; i < dim; i++) y[i] += f[i];
            }
        }
    }
    mesh_.stats.sync_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

namespace {

std::vector<StepEntry> positions_of(const std::vector<RootEntry>& entries) {
    std::vector<StepEntry> at;
    at.reserve(entries.size());
    for (const RootEntry& e : entries) at.push_back(e.at);
    return at;
}

// This node's forward pass over the entries; `own` receives one row of its vocab slice per entry
// that asks for an output
void run_own(Transformer& model, const std::vector<RootEntry>& entries, const int* tokens, std::vector<float>& own) {
    const std::vector<StepEntry> at = positions_of(entries);
    std::unique_ptr<bool[]> wants(new bool[entries.size()]);
    int rows = 0;
    for (size_t e = 0; e < entries.size(); e++) rows += wants[e] = entries[e].output != StepOutput::None;
    own.resize((size_t)rows * model.plan().vocab());
    model.forward(at.data(), (int)at.size(), tokens, wants.get(), rows ? own.data() : nullptr);
}

// The outputs of one node's rows (run_own's), as node `node` of `nodes` answers: Logits rows
// into out.logits at the node's vocab offset, top-k into out.parts[...][node]
void place_own(const Transformer& model, const std::vector<RootEntry>& entries, const std::vector<float>& own,
               int node, int nodes, StepResult& out) {
    const SlicePlan& plan = model.plan();
    const size_t slice = plan.vocab(), vocab = model.config().vocab_size;
    size_t row = 0, li = 0, ti = 0;
    for (const RootEntry& e : entries) {
        if (e.output == StepOutput::None) continue;
        const float* x = own.data() + row++ * slice;
        if (e.output == StepOutput::Logits) {
            std::memcpy(out.logits.data() + li++ * vocab + plan.vocab_begin, x, slice * sizeof(float));
        } else {
            out.parts[ti].resize(nodes);
            out.parts[ti++][node] = top_k(x, (int)slice, plan.vocab_begin, e.temperature);
        }
    }
}

void size_result(const std::vector<RootEntry>& entries, int vocab, StepResult& out) {
    size_t logits = 0, topk = 0;
    for (const RootEntry& e : entries) {
        logits += e.output == StepOutput::Logits;
        topk += e.output == StepOutput::TopK;
    }
    out.logits.assign(logits * vocab, 0.0f);
    out.parts.assign(topk, {});
}

// What a worker answers for an entry with this output: its logits slice, a top-k, or nothing.
size_t reply_bytes(int32_t output, int vocab_slice) {
    if (output == (int32_t)StepOutput::Logits) return (size_t)vocab_slice * sizeof(float);
    if (output == (int32_t)StepOutput::TopK) return sizeof(TopK);
    return 0;
}

}  // namespace

void check_outputs(const std::vector<RootEntry>& entries) {
    for (const RootEntry& e : entries) {
        if (e.output != StepOutput::None && e.output != StepOutput::Logits && e.output != StepOutput::TopK)
            throw std::invalid_argument("output must be NONE, LOGITS or TOPK");
        if (!temperature_in_range(e.temperature)) throw std::invalid_argument("temperature must be a finite number >= 0");
    }
}

void local_step(Transformer& model, const std::vector<RootEntry>& entries, const int* tokens, StepResult& out) {
    check_outputs(entries);
    std::vector<float> own;
    run_own(model, entries, tokens, own);
    size_result(entries, model.config().vocab_size, out);
    place_own(model, entries, own, 0, 1, out);
}

ClusterRoot::ClusterRoot(Transformer& model, Mesh& mesh, bool q80, std::vector<int> worker_vocab)
    : model_(model),
      mesh_(mesh),
      all_reduce_(mesh, q80, model.max_batch(), model.config().dim),
      worker_vocab_(std::move(worker_vocab)) {
    if ((int)worker_vocab_.size() != mesh.size()) throw std::invalid_argument("one vocab slice size per node");
    // the slices cover the vocabulary in node order from the root's, which starts at 0: the root
    // writes every worker's logits after its own and checks each worker's ids against its range
    int64_t total = 0;
    for (int size : worker_vocab_) {
        if (size <= 0) throw std::invalid_argument("every node needs a non-empty vocab slice");
        vocab_begin_.push_back((int)total);
        total += size;
    }
    if (model.plan().vocab_begin != 0 || worker_vocab_[0] != model.plan().vocab() ||
        total != model.config().vocab_size)
        throw std::invalid_argument("the vocab slices must cover the vocabulary in node order, the root's first");
    model_.set_all_reduce(&all_reduce_);
}

void ClusterRoot::step(const std::vector<RootEntry>& entries, const int* tokens, StepResult& out) {
    // a bad entry, token or temperature must fail here, before the workers start on the step
    check_outputs(entries);
    const std::vector<StepEntry> at = positions_of(entries);
    model_.check_step(at.data(), (int)at.size(), tokens);
    int64_t n_tokens = 0;
    std::vector<uint8_t> body(entries.size() * sizeof(WireEntry));
    for (size_t e = 0; e < entries.size(); e++) {
        const RootEntry& x = entries[e];
        const WireEntry w{x.at.seq, x.at.pos, x.at.n, (int32_t)x.output, x.temperature};
        std::memcpy(body.data() + e * sizeof w, &w, sizeof w);
        n_tokens += x.at.n;
    }
    body.insert(body.end(), reinterpret_cast<const uint8_t*>(tokens),
                reinterpret_cast<const uint8_t*>(tokens + n_tokens));
    const StepHeader header{kStepMagic, 0, (int32_t)entries.size(), (int32_t)n_tokens};
    for (int p = 1; p < mesh_.size(); p++) {
        mesh_.send(p, &header, sizeof header);
        mesh_.send(p, body.data(), body.size());
    }

    run_own(model_, entries, tokens, local_);
    size_result(entries, model_.config().vocab_size, out);
    place_own(model_, entries, local_, 0, mesh_.size(), out);
    const size_t vocab = model_.config().vocab_size;
    for (int p = 1; p < mesh_.size(); p++) {
        size_t bytes = 0;
        for (const RootEntry& e : entries) bytes += reply_bytes((int32_t)e.output, worker_vocab_[p]);
        if (bytes == 0) continue;
        reply_.resize(bytes);
        mesh_.recv(p, reply_.data(), bytes);
        const uint8_t* at_reply = reply_.data();
        size_t li = 0, ti = 0;
        for (const RootEntry& e : entries) {
            if (e.output == StepOutput::Logits) {
                const size_t size = (size_t)worker_vocab_[p] * sizeof(float);
                std::memcpy(out.logits.data() + li++ * vocab + vocab_begin_[p], at_reply, size);
                at_reply += size;
            } else if (e.output == StepOutput::TopK) {
                TopK& reply = out.parts[ti++][p];
                std::memcpy(&reply, at_reply, sizeof reply);
                at_reply += sizeof reply;
                const std::string problem = top_k_problem(reply, vocab_begin_[p], worker_vocab_[p]);
                if (!problem.empty())
                    throw NetError(p, mesh_.name(p) + ": sent a malformed top-k reply (" + problem + ")");
            }
        }
    }
}

void ClusterRoot::stop() {
    const StepHeader header{kStepMagic, 1, 0, 0};
    for (int p = 1; p < mesh_.size(); p++) {
        try {
            mesh_.send(p, &header, sizeof header);
        } catch (const NetError&) {
            // a worker already gone needs no goodbye
        }
    }
}

std::string serve_worker(Transformer& model, Mesh& mesh, bool q80) {
    MeshAllReduce all_reduce(mesh, q80, model.max_batch(), model.config().dim);
    model.set_all_reduce(&all_reduce);
    struct Detach {  // the model outlives this session's all-reduce
        Transformer& model;
        ~Detach() { model.set_all_reduce(nullptr); }
    } detach{model};
    std::vector<uint8_t> body, reply;
    std::vector<int32_t> tokens;  // the body's tail, copied to be int-aligned
    std::vector<RootEntry> entries;
    std::vector<float> own;
    const int vocab_slice = model.plan().vocab();
    try {
        for (;;) {
            StepHeader h{};
            mesh.recv(0, &h, sizeof h, /*wait_forever=*/true);
            if (h.magic != kStepMagic) return "the root sent a malformed step";
            if (h.stop == 1) return "the root ended the session";
            // every count bounded before it sizes anything: no more tokens than the KV cache
            // has positions, which this node already holds memory for
            if (h.stop != 0 || h.n_entries < 1 || h.n_entries > model.max_sequences() || h.n_tokens < 1 ||
                (int64_t)h.n_tokens > (int64_t)h.n_entries * model.max_seq_len())
                return "the root sent a step out of range";
            body.resize((size_t)h.n_entries * sizeof(WireEntry) + (size_t)h.n_tokens * sizeof(int32_t));
            mesh.recv(0, body.data(), body.size());
            entries.clear();
            int64_t total = 0;
            size_t reply_size = 0;
            for (int e = 0; e < h.n_entries; e++) {
                WireEntry w;
                std::memcpy(&w, body.data() + e * sizeof w, sizeof w);
                if (w.output < 0 || w.output > 2 || !temperature_in_range(w.temperature) || w.n_tokens < 1)
                    return "the root sent a step out of range";
                total += w.n_tokens;
                reply_size += reply_bytes(w.output, vocab_slice);
                entries.push_back({{w.seq, w.pos, w.n_tokens}, (StepOutput)w.output, w.temperature});
            }
            if (total != h.n_tokens) return "the root sent a step whose entries do not add up to its tokens";
            tokens.resize(h.n_tokens);
            std::memcpy(tokens.data(), body.data() + (size_t)h.n_entries * sizeof(WireEntry), tokens.size() * sizeof(int32_t));
            try {
                run_own(model, entries, tokens.data(), own);
            } catch (const std::invalid_argument& e) {
                return std::string("the root sent a step this node cannot run: ") + e.what();
            }
            if (reply_size == 0) continue;
            reply.resize(reply_size);
            uint8_t* at = reply.data();
            size_t row = 0;
            for (const RootEntry& e : entries) {
                if (e.output == StepOutput::None) continue;
                const float* x = own.data() + row++ * vocab_slice;
                if (e.output == StepOutput::Logits) {
                    std::memcpy(at, x, (size_t)vocab_slice * sizeof(float));
                    at += (size_t)vocab_slice * sizeof(float);
                } else {
                    const TopK t = top_k(x, vocab_slice, model.plan().vocab_begin, e.temperature);
                    std::memcpy(at, &t, sizeof t);
                    at += sizeof t;
                }
            }
            mesh.send(0, reply.data(), reply.size());
        }
    } catch (const NetError& e) {
        return e.what();
    }
}

}  // namespace dllama
