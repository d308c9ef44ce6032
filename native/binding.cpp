// The one binding file: the Q40 block format for the converter, and the per-node
// Transformer the engine drives one step at a time (with the GIL released while it runs).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cluster.h"
#include "forward.h"
#include "kernels.h"
#include "membench.h"

namespace py = pybind11;
using namespace dllama;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<uint8_t, py::array::c_style>;
using Int32s = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// Float32 rows (the last dimension a multiple of 32) as Q40 blocks, the same leading shape.
ByteArray quantize_q40(FloatArray x) {
    py::buffer_info in = x.request();
    if (in.ndim < 1) throw std::invalid_argument("quantize needs at least one dimension");
    const py::ssize_t n = in.shape[in.ndim - 1];
    if (n % kBlockSize) throw std::invalid_argument("the last dimension (" + std::to_string(n) + ") must be a multiple of 32");
    std::vector<py::ssize_t> shape(in.shape.begin(), in.shape.end());
    shape.back() = n / kBlockSize * sizeof(BlockQ40);
    ByteArray out(shape);
    const py::ssize_t rows = n ? in.size / n : 0;
    const float* src = static_cast<const float*>(in.ptr);
    BlockQ40* dst = reinterpret_cast<BlockQ40*>(out.mutable_data());
    const Kernels& kern = kernels();
    {
        py::gil_scoped_release release;
        for (py::ssize_t r = 0; r < rows; r++) kern.quantize_row_q40(src + r * n, dst + r * (n / kBlockSize), (int)n);
    }
    return out;
}

ModelConfig make_config(Arch arch, int dim, int hidden_dim, int n_layers, int n_heads, int n_kv_heads, int head_dim,
                        int vocab_size, int n_experts, int n_active_experts, int moe_hidden_dim, double rope_theta,
                        RopeStyle rope_style, float rope_scaling_factor, float rope_scaling_low_freq_factor,
                        float rope_scaling_high_freq_factor, int rope_scaling_orig_max_seq_len, float norm_eps,
                        FloatType weight_type, int vocab_limit) {
    ModelConfig c;
    c.arch = arch;
    c.dim = dim;
    c.hidden_dim = hidden_dim;
    c.n_layers = n_layers;
    c.n_heads = n_heads;
    c.n_kv_heads = n_kv_heads;
    c.head_dim = head_dim;
    c.vocab_size = vocab_size;
    c.vocab_limit = vocab_limit;
    c.n_experts = n_experts;
    c.n_active_experts = n_active_experts;
    c.moe_hidden_dim = moe_hidden_dim;
    c.rope_theta = rope_theta;
    c.rope_style = rope_style;
    c.rope_scaling = {rope_scaling_factor, rope_scaling_low_freq_factor, rope_scaling_high_freq_factor,
                      rope_scaling_orig_max_seq_len};
    c.norm_eps = norm_eps;
    c.weight_type = weight_type;
    return c;
}

using Range = std::pair<int, int>;

SlicePlan make_plan(Range q_heads, Range kv_heads, Range ffn, Range moe, Range vocab) {
    SlicePlan p;
    std::tie(p.q_head_begin, p.q_head_end) = q_heads;
    std::tie(p.kv_head_begin, p.kv_head_end) = kv_heads;
    std::tie(p.ffn_begin, p.ffn_end) = ffn;
    std::tie(p.moe_begin, p.moe_end) = moe;
    std::tie(p.vocab_begin, p.vocab_end) = vocab;
    return p;
}

struct PyMesh {
    std::unique_ptr<Mesh> mesh;
    PyMesh(int node, std::vector<int> fds, std::vector<std::string> names, int timeout_ms,
           std::optional<std::vector<py::bytes>> keys)
        : mesh(std::make_unique<Mesh>(node, std::move(fds), std::move(names), timeout_ms, key_bytes(keys))) {}

    static std::vector<std::string> key_bytes(const std::optional<std::vector<py::bytes>>& keys) {
        std::vector<std::string> out;
        if (keys)
            for (const py::bytes& k : *keys) out.push_back(k);
        return out;
    }
};

// Owns the Transformer and keeps every buffer it reads weights from in place (F32) alive.
struct PyTransformer {
    std::unique_ptr<Transformer> model;
    std::vector<py::object> owners;
    std::mutex busy;  // one step at a time, whichever Python thread asks
    py::object mesh_owner;  // the root's mesh, kept alive while attached
    std::unique_ptr<ClusterRoot> root;

    ~PyTransformer() {
        root.reset();  // before the mesh it points into
        model->set_all_reduce(nullptr);
    }

    void attach_root(py::object mesh_obj, bool q80, std::vector<int> worker_vocab) {
        PyMesh& m = mesh_obj.cast<PyMesh&>();
        if (worker_vocab.empty() || worker_vocab[0] != model->plan().vocab())
            throw std::invalid_argument("the root's own vocab slice must come first");
        root = std::make_unique<ClusterRoot>(*model, *m.mesh, q80, std::move(worker_vocab));
        mesh_owner = mesh_obj;
    }

    void detach() {
        std::lock_guard<std::mutex> lock(busy);
        if (root) root->stop();
        root.reset();
        model->set_all_reduce(nullptr);
        mesh_owner = py::none();
    }

    // One step over several sequences, on this node alone or on every node of the cluster:
    // per entry None, its logits over the whole vocabulary, or each node's top-k candidates
    // [(ids, logits, log_norm), ...] in node order.
    py::list step(const Int32s& seqs, const Int32s& positions, const Int32s& counts, const Int32s& tokens,
                  const Int32s& outputs, const FloatArray& temperatures) {
        const py::ssize_t n = seqs.size();
        for (const py::array* a : {(const py::array*)&seqs, (const py::array*)&positions, (const py::array*)&counts,
                                   (const py::array*)&tokens, (const py::array*)&outputs, (const py::array*)&temperatures})
            if (a->ndim() != 1) throw std::invalid_argument("every step argument must be a flat array");
        if (positions.size() != n || counts.size() != n || outputs.size() != n || temperatures.size() != n)
            throw std::invalid_argument("seqs, positions, counts, outputs and temperatures need one value per entry");
        std::vector<RootEntry> entries;
        int64_t total = 0;
        for (py::ssize_t e = 0; e < n; e++) {
            const int32_t out = outputs.data()[e];
            if (out != (int32_t)StepOutput::None && out != (int32_t)StepOutput::Logits && out != (int32_t)StepOutput::TopK)
                throw std::invalid_argument("output must be NONE, LOGITS or TOPK");
            if (counts.data()[e] < 1) throw std::invalid_argument("every entry needs at least one token");
            total += counts.data()[e];
            entries.push_back({{seqs.data()[e], positions.data()[e], counts.data()[e]}, (StepOutput)out,
                               temperatures.data()[e]});
        }
        if (total != tokens.size()) throw std::invalid_argument("the counts must add up to the tokens given");
        std::vector<int> ids(tokens.data(), tokens.data() + tokens.size());
        StepResult result;
        {
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(busy);
            if (root) root->step(entries, ids.data(), result);
            else local_step(*model, entries, ids.data(), result);
        }
        const size_t vocab = model->config().vocab_size;
        py::list out;
        size_t li = 0, ti = 0;
        for (const RootEntry& e : entries) {
            if (e.output == StepOutput::None) {
                out.append(py::none());
            } else if (e.output == StepOutput::Logits) {
                py::array_t<float> row(vocab);
                std::memcpy(row.mutable_data(), result.logits.data() + li++ * vocab, vocab * sizeof(float));
                out.append(std::move(row));
            } else {
                py::list parts;
                for (const TopK& t : result.parts[ti++]) {  // each count checked as it came in
                    py::array_t<int32_t> pid(t.count);
                    py::array_t<float> plog(t.count);
                    std::memcpy(pid.mutable_data(), t.ids, t.count * sizeof(int32_t));
                    std::memcpy(plog.mutable_data(), t.logits, t.count * sizeof(float));
                    parts.append(py::make_tuple(pid, plog, t.log_norm));
                }
                out.append(std::move(parts));
            }
        }
        return out;
    }

    std::string serve(py::object mesh_obj, bool q80) {
        PyMesh& m = mesh_obj.cast<PyMesh&>();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(busy);
        return serve_worker(*model, *m.mesh, q80);
    }

    PyTransformer(const ModelConfig& config, const std::optional<SlicePlan>& plan, int n_threads, int max_seq_len,
                  int max_batch, int max_sequences, FloatType kv_cache_type) {
        if (n_threads < 1 || n_threads > 1024) throw std::invalid_argument("nthreads must be between 1 and 1024");
        if (max_seq_len < 1) throw std::invalid_argument("max_seq_len must be positive");
        if (max_batch < 1) throw std::invalid_argument("max_batch must be positive");
        if (max_sequences < 1 || max_sequences > kMaxSequences)
            throw std::invalid_argument("max_sequences must be between 1 and " + std::to_string(kMaxSequences));
        if (kv_cache_type != FloatType::F32 && kv_cache_type != FloatType::F16)
            throw std::invalid_argument("kv_cache_type must be F32 or F16");
        model = std::make_unique<Transformer>(config, plan ? *plan : SlicePlan::whole(config), n_threads, max_seq_len,
                                              max_batch, max_sequences, kv_cache_type);
    }

    void bind(TensorKind kind, int layer, int expert, const py::buffer& buffer, size_t offset, int rows, int cols,
              size_t row_stride, FloatType type) {
        if (type != FloatType::F32 && type != FloatType::Q40)
            throw std::invalid_argument("unsupported float type " + std::to_string((int)type));
        py::buffer_info info = buffer.request();
        const size_t size = (size_t)info.size * info.itemsize;
        if (rows < 1 || cols < 1) throw std::invalid_argument("empty shape");
        const size_t need = (size_t)(rows - 1) * row_stride + row_bytes(type, cols);
        if (offset > size || need > size - offset)
            throw std::invalid_argument("needs " + std::to_string(need) + " bytes at offset " + std::to_string(offset) +
                                        ", buffer has " + std::to_string(size));
        model->bind(kind, layer, expert, static_cast<const uint8_t*>(info.ptr) + offset, rows, cols, row_stride, type);
        if (type != FloatType::Q40) owners.push_back(buffer);  // Q40 matrices were copied (packed)
    }

    py::object forward(py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens, int pos, bool logits,
                       int seq) {
        if (tokens.ndim() != 1) throw std::invalid_argument("tokens must be a flat sequence of ints");
        const int n = (int)tokens.size();
        std::vector<int> ids(tokens.data(), tokens.data() + n);
        py::array_t<float> out;
        float* dst = nullptr;
        if (logits) {
            out = py::array_t<float>(model->plan().vocab());
            dst = out.mutable_data();
        }
        {
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(busy);
            model->forward(ids.data(), n, pos, dst, seq);
        }
        if (!logits) return py::none();
        return std::move(out);
    }
};

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "dllama native core: block formats, kernels and the per-node forward pass";

    m.def("kernel_name", [] { return std::string(kernels().name); },
          "The kernel set chosen for this CPU (DLLAMA_KERNELS=generic forces the portable one).");
    m.def("quantize_q40", &quantize_q40, py::arg("x"),
          "Quantize float32 rows (last dim a multiple of 32) into Q40 blocks, 18 bytes per 32 values.");

    m.def(
        "measure_read_bandwidth",
        [](size_t bytes, int nthreads, int repeats) {
            if (nthreads < 1 || repeats < 1 || bytes < (1 << 20))
                throw std::invalid_argument("need nthreads >= 1, repeats >= 1 and at least 1 MiB");
            py::gil_scoped_release release;
            return measure_read_bandwidth(bytes, nthreads, repeats);
        },
        py::arg("bytes") = (size_t)1 << 30, py::arg("nthreads") = 1, py::arg("repeats") = 5,
        "Bytes per second that nthreads threads stream from memory (best of repeats).");

    py::register_exception<NetError>(m, "NetworkError", PyExc_ConnectionError);

    // values as in a .m header (dllama.config's enums of the same names)
    py::enum_<Arch>(m, "Arch", "A model architecture, as the header's ARCH_TYPE numbers it.")
        .value("LLAMA", Arch::Llama)
        .value("QWEN3", Arch::Qwen3)
        .value("QWEN3_MOE", Arch::Qwen3Moe);
    py::enum_<FloatType>(m, "FloatType", "How a tensor's values are stored, as the header's WEIGHT_FLOAT_TYPE numbers it.")
        .value("F32", FloatType::F32)
        .value("F16", FloatType::F16)
        .value("Q40", FloatType::Q40)
        .value("Q80", FloatType::Q80);
    py::enum_<RopeStyle>(m, "RopeStyle", "Which pairs RoPE rotates: neighbours (Meta's Llama) or the halves of a head.")
        .value("INTERLEAVED", RopeStyle::Interleaved)
        .value("ROTATE_HALF", RopeStyle::RotateHalf);
    py::enum_<TensorKind> kinds(m, "TensorKind", "A weight the forward pass reads (dllama.tensors.KINDS names its tensors).");
    for (int k = 0; k < (int)TensorKind::Count; k++) kinds.value(tensor_kind_name((TensorKind)k), (TensorKind)k);
    py::enum_<StepOutput>(m, "StepOutput", "What a cluster step returns.")
        .value("NONE", StepOutput::None, "nothing (a prompt whose next token is known)")
        .value("LOGITS", StepOutput::Logits, "the last token's logits over the whole vocabulary")
        .value("TOPK", StepOutput::TopK, "per node: its top-64 candidates and softmax normaliser");
    m.attr("MAX_SEQUENCES") = kMaxSequences;

    py::class_<ModelConfig>(m, "ModelConfig",
                            "The model's shape as the core takes it; dllama.native.native_config builds it from a\n"
                            "dllama.config.ModelConfig. The Transformer checks it.")
        .def(py::init(&make_config), py::kw_only(), py::arg("arch"), py::arg("dim"), py::arg("hidden_dim"),
             py::arg("n_layers"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("vocab_size"),
             py::arg("n_experts"), py::arg("n_active_experts"), py::arg("moe_hidden_dim"), py::arg("rope_theta"),
             py::arg("rope_style"), py::arg("rope_scaling_factor"), py::arg("rope_scaling_low_freq_factor"),
             py::arg("rope_scaling_high_freq_factor"), py::arg("rope_scaling_orig_max_seq_len"), py::arg("norm_eps"),
             py::arg("weight_type"), py::arg("vocab_limit") = 0)
        .def_readonly("arch", &ModelConfig::arch)
        .def_readonly("dim", &ModelConfig::dim)
        .def_readonly("hidden_dim", &ModelConfig::hidden_dim)
        .def_readonly("n_layers", &ModelConfig::n_layers)
        .def_readonly("n_heads", &ModelConfig::n_heads)
        .def_readonly("n_kv_heads", &ModelConfig::n_kv_heads)
        .def_readonly("head_dim", &ModelConfig::head_dim)
        .def_readonly("vocab_size", &ModelConfig::vocab_size)
        .def_readonly("vocab_limit", &ModelConfig::vocab_limit)
        .def_readonly("n_experts", &ModelConfig::n_experts)
        .def_readonly("n_active_experts", &ModelConfig::n_active_experts)
        .def_readonly("moe_hidden_dim", &ModelConfig::moe_hidden_dim)
        .def_readonly("rope_theta", &ModelConfig::rope_theta)
        .def_readonly("rope_style", &ModelConfig::rope_style)
        .def_property_readonly("rope_scaling_factor", [](const ModelConfig& c) { return c.rope_scaling.factor; })
        .def_property_readonly("rope_scaling_low_freq_factor",
                               [](const ModelConfig& c) { return c.rope_scaling.low_freq_factor; })
        .def_property_readonly("rope_scaling_high_freq_factor",
                               [](const ModelConfig& c) { return c.rope_scaling.high_freq_factor; })
        .def_property_readonly("rope_scaling_orig_max_seq_len",
                               [](const ModelConfig& c) { return c.rope_scaling.orig_max_seq_len; })
        .def_readonly("norm_eps", &ModelConfig::norm_eps)
        .def_readonly("weight_type", &ModelConfig::weight_type);

    auto range = [](int SlicePlan::*begin, int SlicePlan::*end) {
        return [begin, end](const SlicePlan& p) { return Range(p.*begin, p.*end); };
    };
    py::class_<SlicePlan>(m, "SlicePlan",
                          "The half-open ranges of every sharded dimension one node owns (dllama.cluster.plan.NodeSlice;\n"
                          "dllama.native.native_plan builds it). The Transformer checks them against the model.")
        .def(py::init(&make_plan), py::kw_only(), py::arg("q_heads"), py::arg("kv_heads"), py::arg("ffn"),
             py::arg("moe"), py::arg("vocab"))
        .def_property_readonly("q_heads", range(&SlicePlan::q_head_begin, &SlicePlan::q_head_end))
        .def_property_readonly("kv_heads", range(&SlicePlan::kv_head_begin, &SlicePlan::kv_head_end))
        .def_property_readonly("ffn", range(&SlicePlan::ffn_begin, &SlicePlan::ffn_end))
        .def_property_readonly("moe", range(&SlicePlan::moe_begin, &SlicePlan::moe_end))
        .def_property_readonly("vocab", range(&SlicePlan::vocab_begin, &SlicePlan::vocab_end));

    py::class_<PyMesh>(m, "Mesh")
        .def(py::init<int, std::vector<int>, std::vector<std::string>, int, std::optional<std::vector<py::bytes>>>(),
             py::arg("node"), py::arg("fds"), py::arg("names"), py::arg("timeout_ms") = 10000,
             py::arg("keys") = py::none(),
             "Takes ownership of one connected socket per other node (-1 for this node). keys: None or [] for\n"
             "plain messages, else one per node (b'' for this node, 32 bytes shared with each other node):\n"
             "every message then carries a 16-byte keyed BLAKE2b tag over (sender u32 LE, that direction's\n"
             "message counter u64 LE, payload), and one that fails it is a NetworkError naming its sender.")
        .def("stats", [](PyMesh& self) {
            py::dict d;
            d["sent"] = self.mesh->stats.sent;
            d["received"] = self.mesh->stats.received;
            d["sent_early"] = self.mesh->stats.sent_early;
            d["sync_seconds"] = self.mesh->stats.sync_seconds;
            d["mac_seconds"] = self.mesh->stats.mac_seconds;
            return d;
        });

    py::class_<PyTransformer>(m, "Transformer")
        .def(py::init<const ModelConfig&, const std::optional<SlicePlan>&, int, int, int, int, FloatType>(),
             py::arg("config"), py::arg("plan") = py::none(), py::arg("nthreads") = 1, py::arg("max_seq_len") = 4096,
             py::arg("max_batch") = 128, py::arg("max_sequences") = 1, py::arg("kv_cache_type") = FloatType::F32,
             "One node's forward pass over its slice (None: the whole model), with a KV cache of max_sequences\n"
             "sequences of max_seq_len positions (F32 or F16) allocated here.")
        .def("bind", &PyTransformer::bind, py::arg("kind"), py::arg("layer"), py::arg("expert"), py::arg("buffer"),
             py::arg("offset"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("type"),
             "Binds one weight, named by its kind, layer and expert (0 where the kind has none): an F32 one\n"
             "is read in place (the buffer is kept alive), a Q40 one copied into packed memory of the core's.")
        .def("check_bound", [](PyTransformer& self) { self.model->check_bound(); })
        .def("forward", &PyTransformer::forward, py::arg("tokens"), py::arg("pos"), py::arg("logits") = true,
             py::arg("seq") = 0, "One sequence's tokens at pos; its last token's logits over this node's slice.")
        .def("attach_root", &PyTransformer::attach_root, py::arg("mesh"), py::arg("q80"), py::arg("vocab_slices"),
             "Makes this the root of a cluster: steps then run on every node of the mesh.")
        .def("detach", &PyTransformer::detach, "Tells the workers the session ended and leaves the cluster.")
        .def("step", &PyTransformer::step, py::arg("seqs"), py::arg("positions"), py::arg("counts"), py::arg("tokens"),
             py::arg("outputs"), py::arg("temperatures"),
             "One step: entry e feeds counts[e] tokens (taken in order from tokens) to sequence seqs[e] at\n"
             "positions[e]; per entry None, its logits [vocab] or each node's top-k (ids, logits, log_norm).\n"
             "On this node alone, or on every node once attach_root made this the root of a cluster.")
        .def("serve", &PyTransformer::serve, py::arg("mesh"), py::arg("q80"),
             "A worker's loop: runs the root's steps until the session ends; returns why it ended.");
}
