#include "cluster.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
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
    const size_t row = q80 ? dim / kBlockSize * sizeof(BlockQ80) : dim * sizeof(float);
    out_.resize((size_t)max_batch * row);
    in_.resize((size_t)max_batch * row * mesh.size());
    row_.resize(dim);
}

void MeshAllReduce::sum(float* x, int batch, int dim) {
    const auto start = std::chrono::steady_clock::now();
    const Kernels& kern = kernels();
    const int blocks = dim / kBlockSize;
    const size_t row = q80_ ? blocks * sizeof(BlockQ80) : dim * sizeof(float);
    const size_t bytes = row * batch;
    if (q80_) {
        for (int b = 0; b < batch; b++)
            kern.quantize_row_q80(x + (size_t)b * dim, reinterpret_cast<BlockQ80*>(out_.data() + b * row), dim);
    } else {
        std::memcpy(out_.data(), x, bytes);
    }
    // this node's own part goes where a peer's would, so the sum below is the same everywhere
    std::memcpy(in_.data() + (size_t)mesh_.node() * bytes, out_.data(), bytes);
    mesh_.exchange(out_.data(), in_.data(), bytes);
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
    local_.resize(model.plan().vocab());
}

void ClusterRoot::step(const int* tokens, int n, int pos, StepOutput output, float temperature, float* logits,
                       std::vector<TopK>* parts) {
    const bool wants = output != StepOutput::None;
    StepHeader header{kStepMagic, pos, n, (int32_t)output, temperature};
    // a bad token, position or temperature must fail here, before the workers start on the step
    model_.check_step(n, pos);
    model_.check_tokens(tokens, n);
    if (!temperature_in_range(temperature)) throw std::invalid_argument("temperature must be a finite number >= 0");
    for (int p = 1; p < mesh_.size(); p++) {
        mesh_.send(p, &header, sizeof header);
        mesh_.send(p, tokens, (size_t)n * sizeof(int32_t));
    }
    float* own = output == StepOutput::Logits ? logits : local_.data();
    model_.forward(tokens, n, pos, wants ? own : nullptr);
    if (output == StepOutput::Logits) {
        size_t at = model_.plan().vocab();
        for (int p = 1; p < mesh_.size(); p++) {
            mesh_.recv(p, logits + at, (size_t)worker_vocab_[p] * sizeof(float));
            at += worker_vocab_[p];
        }
    } else if (output == StepOutput::TopK) {
        parts->resize(mesh_.size());
        (*parts)[0] = top_k(local_.data(), model_.plan().vocab(), model_.plan().vocab_begin, temperature);
        for (int p = 1; p < mesh_.size(); p++) {
            TopK& reply = (*parts)[p];
            mesh_.recv(p, &reply, sizeof reply);
            const std::string problem = top_k_problem(reply, vocab_begin_[p], worker_vocab_[p]);
            if (!problem.empty()) throw NetError(p, mesh_.name(p) + ": sent a malformed top-k reply (" + problem + ")");
        }
    }
}

void ClusterRoot::stop() {
    StepHeader header{kStepMagic, 0, 0, (int32_t)StepOutput::Stop, 0};
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
    std::vector<int32_t> tokens;
    std::vector<float> logits(model.plan().vocab());
    try {
        for (;;) {
            StepHeader h{};
            mesh.recv(0, &h, sizeof h, /*wait_forever=*/true);
            if (h.magic != kStepMagic) return "the root sent a malformed step";
            if (h.output == (int32_t)StepOutput::Stop) return "the root ended the session";
            if (h.n_tokens <= 0 || h.n_tokens > model.max_seq_len() || h.pos < 0 ||
                (int64_t)h.pos + h.n_tokens > model.max_seq_len() || h.output < 0 || h.output > 2 ||
                !temperature_in_range(h.temperature))
                return "the root sent a step out of range";
            tokens.resize(h.n_tokens);
            mesh.recv(0, tokens.data(), tokens.size() * sizeof(int32_t));
            const bool wants = h.output != (int32_t)StepOutput::None;
            try {
                model.forward(tokens.data(), h.n_tokens, h.pos, wants ? logits.data() : nullptr);
            } catch (const std::invalid_argument& e) {
                return std::string("the root sent a step this node cannot run: ") + e.what();
            }
            if (h.output == (int32_t)StepOutput::Logits) {
                mesh.send(0, logits.data(), logits.size() * sizeof(float));
            } else if (h.output == (int32_t)StepOutput::TopK) {
                const TopK t = top_k(logits.data(), model.plan().vocab(), model.plan().vocab_begin, h.temperature);
                mesh.send(0, &t, sizeof t);
            }
        }
    } catch (const NetError& e) {
        return e.what();
    }
}

}  // namespace dllama
