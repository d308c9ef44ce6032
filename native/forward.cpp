#include "forward.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace dllama {

static void require(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument(what);
}

Transformer::Transformer(const ModelConfig& c, const SlicePlan& p, int n_threads, int max_seq_len,
                         int max_batch, int max_sequences, FloatType kv_type)
    : config_(c),
      plan_(p),
      max_seq_len_(max_seq_len),
      max_batch_(max_batch),
      max_sequences_(max_sequences),
      kv_type_(kv_type),
      pool_(n_threads),
      rope_(c.head_dim, max_seq_len, c.rope_theta, c.rope_scaling) {
    require(c.arch == Arch::Llama || c.arch == Arch::Qwen3 || c.arch == Arch::Qwen3Moe,
            "unknown architecture " + std::to_string((int)c.arch));
    require(c.dim > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.head_dim > 0 &&
                c.vocab_size > 0,
            "model dimensions must be positive");
    require(c.vocab_limit >= 0 && c.vocab_limit <= c.vocab_size, "vocab_limit must be within 0..vocab_size");
    require(c.n_heads % c.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads");
    require(c.head_dim % 2 == 0, "head_dim must be even for RoPE");
    require(c.rope_style == RopeStyle::Interleaved || c.rope_style == RopeStyle::RotateHalf, "unknown rope style");
    const RopeTable::Scaling& rs = c.rope_scaling;
    require(rs.factor <= 0 || (rs.orig_max_seq_len > 0 && 0 < rs.low_freq_factor && rs.low_freq_factor < rs.high_freq_factor),
            "llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor and orig_max_seq_len > 0");
    require(max_seq_len > 0 && max_batch > 0, "max_seq_len and max_batch must be positive");
    require(max_sequences > 0 && max_sequences <= kMaxSequences,
            "max_sequences must be between 1 and " + std::to_string(kMaxSequences));
    require(kv_type == FloatType::F32 || kv_type == FloatType::F16, "the KV cache must be F32 or F16");
    require(!c.is_moe() || (c.n_experts > 0 && c.n_active_experts > 0 &&
                            c.n_active_experts <= c.n_experts && c.moe_hidden_dim > 0),
            "a MoE model needs n_experts >= n_active_experts > 0 and moe_hidden_dim > 0");
    require(c.is_moe() || c.hidden_dim > 0, "a dense model needs hidden_dim > 0");
    check_plan(c, p);
    q_dim_ = p.q_heads() * c.head_dim;
    kv_dim_ = p.kv_heads() * c.head_dim;
    ffn_dim_ = c.is_moe() ? 0 : p.ffn();
    moe_dim_ = c.is_moe() ? p.moe() : 0;
    if (c.weight_type == FloatType::Q40) {
        const int32_t dims[] = {c.dim, q_dim_, ffn_dim_, moe_dim_};
        for (int d : dims)
            require(d % kBlockSize == 0, "Q40 weights need every sliced dimension to be a multiple of 32");
    } else {
        require(c.weight_type == FloatType::F32, "weights must be F32 or Q40");
    }

    const size_t B = max_batch, dim = c.dim;
    const int k = c.is_moe() ? c.n_active_experts : 1;
    const int hidden = c.is_moe() ? moe_dim_ : ffn_dim_;
    x_.resize(B * dim);
    xb_.resize(B * dim);
    xq_.resize(B * dim / kBlockSize);
    q_.resize(B * q_dim_);
    k_.resize(B * kv_dim_);
    v_.resize(B * kv_dim_);
    att_.resize(B * q_dim_);
    attq_.resize(B * q_dim_ / kBlockSize);
    part_.resize(B * dim);
    scores_.resize((size_t)pool_.size() * max_seq_len);
    h1_.resize(B * k * hidden);
    h3_.resize(B * k * hidden);
    hq_.resize(B * k * hidden / kBlockSize);
    const size_t outputs = std::min(max_batch, max_sequences);
    final_.resize(outputs * dim);
    finalq_.resize(outputs * dim / kBlockSize);
    tok_seq_.resize(B);
    tok_pos_.resize(B);
    if (c.is_moe()) {
        router_.resize(B * c.n_experts);
        if (c.weight_type == FloatType::Q40) gxq_.resize(B * k * dim / kBlockSize);
        else gx_.resize(B * k * dim);
        eout_.resize(B * k * dim);
        route_expert_.resize(B * k);
        route_weight_.resize(B * k);
        route_slot_.resize(B * k);
    }
    weights_.layers.resize(c.n_layers);
    for (auto& l : weights_.layers) l.experts.resize(c.is_moe() ? c.n_experts : 0);
    kv_row_bytes_ = (size_t)kv_dim_ * (kv_type == FloatType::F16 ? sizeof(uint16_t) : sizeof(float));
    key_cache_.resize(c.n_layers);
    value_cache_.resize(c.n_layers);
    const size_t cache_bytes = (size_t)max_sequences * max_seq_len * kv_row_bytes_;
    for (int l = 0; l < c.n_layers; l++) {  // zeroed: the memory is the process's from here on
        key_cache_[l].assign(cache_bytes, 0);
        value_cache_[l].assign(cache_bytes, 0);
    }
}

// "WQ of layer 3", "EXPERT_UP of layer 0 expert 7", "LM_HEAD"
static std::string weight_name(const TensorSlot& slot, TensorKind kind, int layer, int expert, const Weights& w) {
    std::string out = tensor_kind_name(kind);
    const bool model_wide = slot.tensor == &w.embedding || slot.tensor == &w.final_norm || slot.tensor == &w.lm_head;
    if (!model_wide) out += " of layer " + std::to_string(layer);
    if (kind == TensorKind::ExpertGate || kind == TensorKind::ExpertDown || kind == TensorKind::ExpertUp)
        out += " expert " + std::to_string(expert);
    return out;
}

void Transformer::bind(TensorKind kind, int layer, int expert, const uint8_t* data, int rows, int cols,
                       size_t row_stride, FloatType type) {
    const TensorSlot slot = find_tensor_slot(weights_, config_, plan_, kind, layer, expert);
    require(slot.tensor != nullptr, std::string("this model has no ") + tensor_kind_name(kind) + " weight");
    auto shape = [](int r, int c) { return "[" + std::to_string(r) + ", " + std::to_string(c) + "]"; };
    require(rows == slot.rows && cols == slot.cols,
            "expected shape " + shape(slot.rows, slot.cols) + ", got " + shape(rows, cols));
    require(type == slot.type, "unexpected float type " + std::to_string((int)type));
    require(data != nullptr, "no data");
    require(row_stride >= row_bytes(type, cols), "row stride shorter than a row");
    if (type == FloatType::Q40) {
        AlignedBytes& own = packed_[slot.tensor];
        own = alloc_packed_q40(rows, cols);
        const int groups = q40_groups(rows);
        uint8_t* out = own.get();
        const PackQ40Fn pack = kernels().pack_q40;  // the layout the chosen set's matmul reads
        pool_.run([&](int t, int nt) {  // the copy's cost is first touching fresh pages: share it
            pack(data, row_stride, rows, cols, groups * t / nt, groups * (t + 1) / nt, out);
        });
        *slot.tensor = Tensor{out, type, rows, cols, 0, true};
    } else {
        *slot.tensor = Tensor{data, type, rows, cols, row_stride};
    }
}

void Transformer::check_bound() const {
    // every kind at every layer and expert: a model-wide kind's slot is the same at each, a
    // layer's at each expert
    auto& weights = const_cast<Weights&>(weights_);
    const int experts = std::max(1, config_.n_experts);
    for (int k = 0; k < (int)TensorKind::Count; k++) {
        const TensorKind kind = (TensorKind)k;
        for (int l = 0; l < config_.n_layers; l++) {
            for (int e = 0; e < experts; e++) {
                const TensorSlot slot = find_tensor_slot(weights, config_, plan_, kind, l, e);
                if (slot.tensor && slot.tensor->data == nullptr)
                    throw std::invalid_argument("weight " + weight_name(slot, kind, l, e, weights_) + " was not bound");
            }
        }
    }
}

void Transformer::run_matmuls(const MatmulJob* jobs, int n_jobs) {
    pool_.run([&](int t, int nt) { matmul_share(jobs, n_jobs, t, nt); });
}

void Transformer::matmul_share(const MatmulJob* jobs, int n_jobs, int t, int nt) {
    const Kernels& kern = kernels();
    // The jobs' rows, laid end to end and weighted by the batch they meet, are cut into one
    // contiguous share per thread: a thread streams whole matrices where it can (a stream
    // restarted at every matrix costs its prefetch warm-up), and uneven batches (experts
    // chosen by more prompt tokens) still balance.
    int64_t total = 0;
    for (int j = 0; j < n_jobs; j++) total += (int64_t)jobs[j].rows() * (jobs[j].batch + 1) * (jobs[j].batch > 0);
    const int64_t begin = total * t / nt, end = total * (t + 1) / nt;
    int64_t at = 0;
    for (int j = 0; j < n_jobs && at < end; j++) {
        const MatmulJob& job = jobs[j];
        const Tensor& w = *job.w;
        if (job.batch == 0) continue;
        const int rows = job.rows();
        const int64_t per_row = job.batch + 1, size = (int64_t)rows * per_row;
        if (at + size > begin) {
            // this job's rows inside [begin, end), rounded to whole groups of 8 rows (a
            // packed group is written by one thread; the f32 tiles are 4 rows or fewer)
            auto row_at = [&](int64_t pos) {
                const int64_t r = (std::clamp(pos, at, at + size) - at + per_row - 1) / per_row;
                return job.r0 + (r >= rows ? rows : (int)(r / kQ40GroupRows * kQ40GroupRows));
            };
            const int r0 = row_at(begin), r1 = row_at(end);
            if (r0 < r1) {
                if (w.type == FloatType::Q40) {
                    kern.matmul_q40x8_q80(job.y, w.rows, w.data, static_cast<const BlockQ80*>(job.x),
                                          w.cols / kBlockSize, w.cols, r0, r1, job.batch);
                } else {
                    kern.matmul_f32(job.y, w.rows, w.data, w.row_stride, static_cast<const float*>(job.x),
                                    w.cols, w.cols, r0, r1, job.batch);
                }
            }
        }
        at += size;
    }
}

const void* Transformer::matmul_input(const float* x, BlockQ80* xq, int rows, int cols) {
    if (config_.weight_type != FloatType::Q40) return x;
    const Kernels& kern = kernels();
    const int blocks = cols / kBlockSize;
    if (rows == 1) {
        kern.quantize_row_q80(x, xq, cols);
    } else {
        pool_.run([&](int t, int nt) {
            for (int r = t; r < rows; r += nt) kern.quantize_row_q80(x + (size_t)r * cols, xq + (size_t)r * blocks, cols);
        });
    }
    return xq;
}

template <typename Finish>
void Transformer::project_and_sync(const MatmulJob* jobs, int n_jobs, int n, Finish&& finish) {
    const int dim = config_.dim;
    // Pieces only where another thread computes while one hands a piece on: with a single
    // thread every piece's quantize, tag and send system calls sit on the matmul's own path
    // (measured over bench-cluster's links, 2 nodes of 1 thread: decode 8 % slower in pieces).
    const bool in_pieces = all_reduce_ && n == 1 && pool_.size() > 1;
    const int step = in_pieces ? std::clamp(all_reduce_->piece(n, dim), 1, dim) : dim;
    const int pieces = (dim + step - 1) / step;
    if (pieces == 1) {
        run_matmuls(jobs, n_jobs);
        finish(0, dim);
        if (all_reduce_) all_reduce_->sum(part_.data(), n, dim);
        return;
    }
    // Every thread runs its share of piece 0, then of piece 1, ...; the thread that completes a
    // piece hands it on (finish, then the all-reduce sends it) while the others compute on: no
    // thread waits at a piece's end, and where one core can keep the DRAM busy (a Pi 5) the
    // system calls cost the matmul next to nothing. Pieces go in order, one thread at a time.
    std::vector<MatmulJob> piece_jobs((size_t)pieces * n_jobs);
    for (int c = 0; c < pieces; c++) {
        for (int j = 0; j < n_jobs; j++) {
            MatmulJob& job = piece_jobs[(size_t)c * n_jobs + j];
            job = jobs[j];
            job.r0 = c * step;
            job.r1 = std::min(dim, (c + 1) * step);
        }
    }
    std::unique_ptr<std::atomic<int>[]> shares_done(new std::atomic<int>[pieces]);
    for (int c = 0; c < pieces; c++) shares_done[c].store(0, std::memory_order_relaxed);
    std::vector<char> complete(pieces, 0);
    int next = 0;  // the first piece not handed on yet
    std::mutex handing;
    std::exception_ptr failed;  // a peer's error, rethrown on this thread
    pool_.run([&](int t, int nt) {
        for (int c = 0; c < pieces; c++) {
            matmul_share(&piece_jobs[(size_t)c * n_jobs], n_jobs, t, nt);
            if (shares_done[c].fetch_add(1, std::memory_order_acq_rel) != nt - 1) continue;
            std::lock_guard<std::mutex> lock(handing);
            complete[c] = 1;
            for (; next < pieces && complete[next] && !failed; next++) {
                try {
                    const int c1 = std::min(dim, (next + 1) * step);
                    finish(next * step, c1);
                    all_reduce_->ready(part_.data(), n, dim, c1);
                } catch (...) {
                    failed = std::current_exception();
                }
            }
        }
    });
    if (failed) std::rethrow_exception(failed);
    all_reduce_->sum(part_.data(), n, dim);
}

void Transformer::check_step(const StepEntry* entries, int n_entries, const int* tokens) const {
    if (n_entries <= 0) throw std::invalid_argument("a step needs at least one entry");
    std::vector<bool> seen(max_sequences_, false);
    int64_t total = 0;
    for (int e = 0; e < n_entries; e++) {
        const StepEntry& x = entries[e];
        if (x.seq < 0 || x.seq >= max_sequences_)
            throw std::invalid_argument("sequence " + std::to_string(x.seq) + " is not in 0.." +
                                        std::to_string(max_sequences_ - 1));
        if (seen[x.seq]) throw std::invalid_argument("sequence " + std::to_string(x.seq) + " appears twice in one step");
        seen[x.seq] = true;
        if (x.n <= 0) throw std::invalid_argument("every entry needs at least one token");
        if (x.pos < 0 || (int64_t)x.pos + x.n > max_seq_len_)
            throw std::invalid_argument("position " + std::to_string(x.pos) + " + " + std::to_string(x.n) +
                                        " tokens exceeds max_seq_len " + std::to_string(max_seq_len_));
        total += x.n;
    }
    for (int64_t i = 0; i < total; i++)
        if (tokens[i] < 0 || tokens[i] >= config_.vocab_size)
            throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " is outside the vocabulary [0, " +
                                        std::to_string(config_.vocab_size) + ")");
}

void Transformer::embed(const int* tokens, int n, float* x) const {
    const size_t dim = config_.dim;
    for (int i = 0; i < n; i++) std::memcpy(x + i * dim, weights_.embedding.row(tokens[i]), dim * sizeof(float));
}

void Transformer::forward(const int* tokens, int n, int pos, float* logits, int seq) {
    const StepEntry entry{seq, pos, n};
    const bool wants = logits != nullptr;
    forward(&entry, 1, tokens, &wants, logits);
}

void Transformer::forward(const StepEntry* entries, int n_entries, const int* tokens, const bool* wants,
                          float* logits) {
    check_step(entries, n_entries, tokens);  // all of it before the first chunk changes a cache
    // the step's tokens end to end, cut into chunks of max_batch rows; an entry may span chunks
    // (its later tokens see the earlier ones through the cache)
    int64_t total = 0;
    for (int e = 0; e < n_entries; e++) total += entries[e].n;
    const size_t vocab = plan_.vocab();
    int entry = 0, in_entry = 0, out_row = 0;
    std::vector<int> out_rows;
    for (int64_t done = 0; done < total;) {
        const int chunk = (int)std::min<int64_t>(max_batch_, total - done);
        out_rows.clear();
        const int first_out = out_row;
        for (int b = 0; b < chunk; b++) {
            const StepEntry& x = entries[entry];
            tok_seq_[b] = x.seq;
            tok_pos_[b] = x.pos + in_entry;
            if (++in_entry == x.n) {  // the entry's last token
                if (wants[entry]) {
                    out_rows.push_back(b);
                    out_row++;
                }
                entry++;
                in_entry = 0;
            }
        }
        embed(tokens + done, chunk, x_.data());
        forward_chunk(chunk, out_rows, logits ? logits + (size_t)first_out * vocab : nullptr);
        done += chunk;
    }
}

void Transformer::forward_chunk(int n, const std::vector<int>& out_rows, float* logits) {
    const ModelConfig& c = config_;
    const size_t dim = c.dim;

    for (int l = 0; l < c.n_layers; l++) {
        const LayerWeights& L = weights_.layers[l];
        // attention block: x += wo(attention(norm(x)))
        for (int b = 0; b < n; b++) rmsnorm(&xb_[b * dim], &x_[b * dim], L.attn_norm.f32(), c.dim, c.norm_eps);
        attention(l, n);  // part_: this node's share of the update, summed across the nodes
        for (size_t i = 0; i < n * dim; i++) x_[i] += part_[i];

        // feed-forward block: x += ffn(norm(x))
        for (int b = 0; b < n; b++) rmsnorm(&xb_[b * dim], &x_[b * dim], L.ffn_norm.f32(), c.dim, c.norm_eps);
        if (c.is_moe()) moe_ffn(l, n);
        else dense_ffn(l, n);
        for (size_t i = 0; i < n * dim; i++) x_[i] += part_[i];
    }

    if (out_rows.empty() || !logits) return;
    // final norm and LM head over the rows that give an output: the LM head read once for all
    const int outs = (int)out_rows.size();
    for (int o = 0; o < outs; o++)
        rmsnorm(&final_[o * dim], &x_[(size_t)out_rows[o] * dim], weights_.final_norm.f32(), c.dim, c.norm_eps);
    const void* in = matmul_input(final_.data(), finalq_.data(), outs, c.dim);
    MatmulJob job{&weights_.lm_head, logits, in, outs};
    run_matmuls(&job, 1);
    // padding rows past the tokenizer's vocabulary: never a candidate
    const int vocab = plan_.vocab(), first_padding = std::max(0, c.vocab_limit - plan_.vocab_begin);
    if (c.vocab_limit > 0 && first_padding < vocab)
        for (int o = 0; o < outs; o++)
            std::fill(logits + (size_t)o * vocab + first_padding, logits + (size_t)(o + 1) * vocab, -INFINITY);
}

void Transformer::attention(int l, int n) {
    const ModelConfig& c = config_;
    const LayerWeights& L = weights_.layers[l];
    const Kernels& kern = kernels();
    const int hd = c.head_dim, n_q = plan_.q_heads(), n_kv = plan_.kv_heads();
    const int group = c.n_heads / c.n_kv_heads;

    // q, k, v projections of every token in one pass over the weights
    const void* in = matmul_input(xb_.data(), xq_.data(), n, c.dim);
    const MatmulJob qkv[] = {{&L.wq, q_.data(), in, n}, {&L.wk, k_.data(), in, n}, {&L.wv, v_.data(), in, n}};
    run_matmuls(qkv, 3);

    // per-head q/k norm (qwen3), rotary position, then k and v into the cache
    std::vector<uint8_t>& kc = key_cache_[l];
    std::vector<uint8_t>& vc = value_cache_[l];
    const bool f16 = kv_type_ == FloatType::F16;
    const RopeStyle style = c.rope_style;
    pool_.for_chunks(n, [&](int b) {
        float* q = &q_[(size_t)b * q_dim_];
        float* k = &k_[(size_t)b * kv_dim_];
        const float* v = &v_[(size_t)b * kv_dim_];
        const int s = tok_seq_[b], p = tok_pos_[b];
        if (c.has_qk_norm()) {
            for (int h = 0; h < n_q; h++) rmsnorm(q + h * hd, q + h * hd, L.q_norm.f32(), hd, c.norm_eps);
            for (int h = 0; h < n_kv; h++) rmsnorm(k + h * hd, k + h * hd, L.k_norm.f32(), hd, c.norm_eps);
        }
        rope_.apply(q, n_q, p, style);
        rope_.apply(k, n_kv, p, style);
        if (f16) {
            kern.convert_f32_f16(k, reinterpret_cast<uint16_t*>(kv_at(kc, s, p)), kv_dim_);
            kern.convert_f32_f16(v, reinterpret_cast<uint16_t*>(kv_at(vc, s, p)), kv_dim_);
        } else {
            std::memcpy(kv_at(kc, s, p), k, kv_row_bytes_);
            std::memcpy(kv_at(vc, s, p), v, kv_row_bytes_);
        }
    });

    // causal attention: token b at position p of sequence s sees that sequence's positions 0..p
    // (written above for this chunk's own tokens, earlier for the rest)
    const float scale = 1.0f / std::sqrt((float)hd);
    const size_t elem = f16 ? sizeof(uint16_t) : sizeof(float);
    pool_.run([&](int t, int nt) {
        float* scores = &scores_[(size_t)t * max_seq_len_];
        for (int task = t; task < n * n_q; task += nt) {
            const int b = task / n_q, h = task % n_q;
            const int kvh = (plan_.q_head_begin + h) / group - plan_.kv_head_begin;
            const int s = tok_seq_[b], len = tok_pos_[b] + 1;
            const float* q = &q_[(size_t)b * q_dim_ + h * hd];
            const uint8_t* keys = kv_at(kc, s, 0) + (size_t)kvh * hd * elem;
            const uint8_t* values = kv_at(vc, s, 0) + (size_t)kvh * hd * elem;
            float* out = &att_[(size_t)b * q_dim_ + h * hd];
            std::memset(out, 0, hd * sizeof(float));
            if (f16) {
                for (int i = 0; i < len; i++)
                    scores[i] = kern.vec_dot_f16(hd, q, reinterpret_cast<const uint16_t*>(keys + i * kv_row_bytes_)) * scale;
                softmax(scores, len);
                for (int i = 0; i < len; i++)
                    kern.vec_mad_f16(hd, out, reinterpret_cast<const uint16_t*>(values + i * kv_row_bytes_), scores[i]);
            } else {
                for (int i = 0; i < len; i++)
                    scores[i] = kern.vec_dot_f32(hd, q, reinterpret_cast<const float*>(keys + i * kv_row_bytes_)) * scale;
                softmax(scores, len);
                for (int i = 0; i < len; i++)
                    kern.vec_mad_f32(hd, out, reinterpret_cast<const float*>(values + i * kv_row_bytes_), scores[i]);
            }
        }
    });

    // output projection: this node's heads' share of the residual update
    const void* ain = matmul_input(att_.data(), attq_.data(), n, q_dim_);
    const MatmulJob o{&L.wo, part_.data(), ain, n};
    project_and_sync(&o, 1, n, [](int, int) {});
}

void Transformer::dense_ffn(int l, int n) {
    const LayerWeights& L = weights_.layers[l];
    const int hidden = ffn_dim_;
    // w2(silu(w1 x) * w3 x)
    const void* in = matmul_input(xb_.data(), xq_.data(), n, config_.dim);
    const MatmulJob gate_up[] = {{&L.gate, h1_.data(), in, n}, {&L.up, h3_.data(), in, n}};
    run_matmuls(gate_up, 2);
    pool_.for_chunks(n, [&](int b) {
        float* h = &h1_[(size_t)b * hidden];
        silu_mul(h, h, &h3_[(size_t)b * hidden], hidden);
    });
    const void* hin = matmul_input(h1_.data(), hq_.data(), n, hidden);
    const MatmulJob down{&L.down, part_.data(), hin, n};
    project_and_sync(&down, 1, n, [](int, int) {});
}

// w2(silu(w1 x) * w3 x) of the k experts the router picks for each token, weighted by its
// router probabilities: route, group the tokens by expert, run the experts, combine
void Transformer::moe_ffn(int l, int n) {
    const LayerWeights& L = weights_.layers[l];
    std::vector<int> count(config_.n_experts, 0);
    route(L, n, count);
    const std::vector<int> offset = group_by_expert(n, count);
    const std::vector<MatmulJob> down = run_gate_up(L, n, count, offset);
    // a piece of the output is complete over all the step's experts before it is handed on
    project_and_sync(down.data(), (int)down.size(), n, [&](int c0, int c1) { combine_experts(n, c0, c1); });
}

// router: softmax over all experts, keep the top k, renormalise their probabilities; count[e]
// gains one for every token that chose expert e
void Transformer::route(const LayerWeights& L, int n, std::vector<int>& count) {
    const int E = config_.n_experts, k = config_.n_active_experts;
    MatmulJob router{&L.router, router_.data(), xb_.data(), n};
    run_matmuls(&router, 1);
    for (int b = 0; b < n; b++) {
        float* p = &router_[(size_t)b * E];
        softmax(p, E);
        int* chosen = &route_expert_[(size_t)b * k];
        float* w = &route_weight_[(size_t)b * k];
        float total = 0;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                if (std::find(chosen, chosen + j, e) != chosen + j) continue;
                if (best < 0 || p[e] > p[best]) best = e;
            }
            chosen[j] = best;
            w[j] = p[best];
            total += p[best];
            count[best]++;
        }
        for (int j = 0; j < k; j++) w[j] /= total;
    }
}

// the (token, choice) pairs grouped by expert, so each expert's weights are read once: every
// pair's row in the grouped buffers (route_slot_) and its token's input gathered there (gx_, or
// gxq_ for Q40 weights); returns where each expert's rows begin (offset[E] = n * k)
std::vector<int> Transformer::group_by_expert(int n, const std::vector<int>& count) {
    const int E = config_.n_experts, k = config_.n_active_experts;
    const size_t dim = config_.dim;
    std::vector<int> offset(E + 1, 0);
    for (int e = 0; e < E; e++) offset[e + 1] = offset[e] + count[e];
    std::vector<int> fill(offset.begin(), offset.end() - 1);
    for (int a = 0; a < n * k; a++) route_slot_[a] = fill[route_expert_[a]]++;
    const int rows = n * k;
    const size_t blocks = dim / kBlockSize;
    if (config_.weight_type == FloatType::Q40) {
        matmul_input(xb_.data(), xq_.data(), n, config_.dim);
        for (int a = 0; a < rows; a++)
            std::memcpy(&gxq_[route_slot_[a] * blocks], &xq_[(a / k) * blocks], blocks * sizeof(BlockQ80));
    } else {
        for (int a = 0; a < rows; a++)
            std::memcpy(&gx_[route_slot_[a] * dim], &xb_[(a / k) * dim], dim * sizeof(float));
    }
    return offset;
}

// every chosen expert over its rows of the grouped buffers: silu(w1 x) * w3 x; returns the jobs
// of w2 of it into eout_ (all of their rows), for the caller to run
std::vector<Transformer::MatmulJob> Transformer::run_gate_up(const LayerWeights& L, int n, const std::vector<int>& count,
                                                             const std::vector<int>& offset) {
    const int E = config_.n_experts, k = config_.n_active_experts, hidden = moe_dim_;
    const size_t dim = config_.dim, blocks = dim / kBlockSize;
    const bool quantized = config_.weight_type == FloatType::Q40;
    auto gathered = [&](int slot) -> const void* {
        return quantized ? (const void*)&gxq_[slot * blocks] : (const void*)&gx_[slot * dim];
    };

    std::vector<MatmulJob> jobs;
    for (int e = 0; e < E; e++) {
        if (!count[e]) continue;
        const ExpertWeights& X = L.experts[e];
        jobs.push_back({&X.gate, &h1_[(size_t)offset[e] * hidden], gathered(offset[e]), count[e]});
        jobs.push_back({&X.up, &h3_[(size_t)offset[e] * hidden], gathered(offset[e]), count[e]});
    }
    run_matmuls(jobs.data(), (int)jobs.size());
    const int rows = n * k;
    pool_.for_chunks(rows, [&](int r) {
        float* h = &h1_[(size_t)r * hidden];
        silu_mul(h, h, &h3_[(size_t)r * hidden], hidden);
    });
    const void* hin = matmul_input(h1_.data(), hq_.data(), rows, hidden);
    const size_t hstride = quantized ? hidden / kBlockSize : hidden;

    jobs.clear();
    for (int e = 0; e < E; e++) {
        if (!count[e]) continue;
        const void* x = quantized ? (const void*)(static_cast<const BlockQ80*>(hin) + offset[e] * hstride)
                                  : (const void*)(static_cast<const float*>(hin) + offset[e] * hstride);
        jobs.push_back({&L.experts[e].down, &eout_[(size_t)offset[e] * dim], x, count[e]});
    }
    return jobs;
}

// each token's k expert outputs weighted by its renormalised router probabilities, into
// part_'s columns [c0, c1)
void Transformer::combine_experts(int n, int c0, int c1) {
    const Kernels& kern = kernels();
    const int k = config_.n_active_experts;
    const size_t dim = config_.dim;
    pool_.for_chunks(n, [&](int b) {
        float* out = &part_[b * dim + c0];
        std::memset(out, 0, (c1 - c0) * sizeof(float));
        for (int j = 0; j < k; j++) {
            const int a = b * k + j;
            kern.vec_mad_f32(c1 - c0, out, &eout_[(size_t)route_slot_[a] * dim + c0], route_weight_[a]);
        }
    });
}

}  // namespace dllama
