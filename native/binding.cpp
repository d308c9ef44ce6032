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

template <typename T>
T get(const py::dict& d, const char* key, T fallback) {
    return d.contains(key) ? d[key].cast<T>() : fallback;
}

template <typename T>
T need(const py::dict& d, const char* key) {
    if (!d.contains(key)) throw std::invalid_argument(std::string("model config lacks '") + key + "'");
    return d[key].cast<T>();
}

ModelConfig config_from(const py::dict& d) {
    ModelConfig c;
    const int arch = need<int>(d, "arch");
    if (arch != (int)Arch::Llama && arch != (int)Arch::Qwen3 && arch != (int)Arch::Qwen3Moe)
        throw std::invalid_argument("unknown architecture " + std::to_string(arch));
    c.arch = (Arch)arch;
    c.dim = need<int>(d, "dim");
    c.hidden_dim = get<int>(d, "hidden_dim", 0);
    c.n_layers = need<int>(d, "n_layers");
    c.n_heads = need<int>(d, "n_heads");
    c.n_kv_heads = need<int>(d, "n_kv_heads");
    c.head_dim = get<int>(d, "head_dim", c.n_heads ? c.dim / c.n_heads : 0);
    c.n_experts = get<int>(d, "n_experts", 0);
    c.n_active_experts = get<int>(d, "n_active_experts", 0);
    c.moe_hidden_dim = get<int>(d, "moe_hidden_dim", 0);
    c.vocab_size = need<int>(d, "vocab_size");
    c.rope_theta = get<double>(d, "rope_theta", 10000.0);
    const std::string style = get<std::string>(d, "rope_style", "interleaved");
    if (style != "interleaved" && style != "rotate_half")
        throw std::invalid_argument("rope_style must be 'interleaved' or 'rotate_half'");
    c.rope_style = style == "interleaved" ? RopeStyle::Interleaved : RopeStyle::RotateHalf;
    c.rope_scaling.factor = get<float>(d, "rope_scaling_factor", 0);
    c.rope_scaling.low_freq_factor = get<float>(d, "rope_scaling_low_freq_factor", 0);
    c.rope_scaling.high_freq_factor = get<float>(d, "rope_scaling_high_freq_factor", 0);
    c.rope_scaling.orig_max_seq_len = get<int>(d, "rope_scaling_orig_max_seq_len", 0);
    if (c.rope_scaling.factor > 0 &&
        (c.rope_scaling.orig_max_seq_len <= 0 || c.rope_scaling.high_freq_factor <= c.rope_scaling.low_freq_factor ||
         c.rope_scaling.low_freq_factor <= 0))
        throw std::invalid_argument("llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor and orig_max_seq_len > 0");
    c.norm_eps = get<float>(d, "norm_eps", 1e-5f);
    c.weight_type = (FloatType)get<int>(d, "weight_type", (int)FloatType::Q40);
    return c;
}

SlicePlan plan_from(const ModelConfig& c, const py::object& obj) {
    SlicePlan p = SlicePlan::whole(c);
    if (obj.is_none()) return p;
    const py::dict d = obj.cast<py::dict>();
    auto range = [&](const char* key, int& begin, int& end, int limit) {
        if (!d.contains(key)) return;
        auto pair = d[key].cast<std::pair<int, int>>();
        if (pair.first < 0 || pair.second <= pair.first || pair.second > limit)
            throw std::invalid_argument(std::string("slice plan: bad range for ") + key);
        begin = pair.first;
        end = pair.second;
    };
    range("q_heads", p.q_head_begin, p.q_head_end, c.n_heads);
    range("kv_heads", p.kv_head_begin, p.kv_head_end, c.n_kv_heads);
    range("ffn", p.ffn_begin, p.ffn_end, c.hidden_dim);
    range("moe", p.moe_begin, p.moe_end, c.moe_hidden_dim);
    range("vocab", p.vocab_begin, p.vocab_end, c.vocab_size);
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

    // One step on every node: output 0 nothing, 1 full logits, 2 top-k parts per node.
    py::object step(py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens, int pos, int output,
                    float temperature) {
        if (!root) throw std::invalid_argument("not attached to a cluster");
        if (output < 0 || output > 2) throw std::invalid_argument("output must be 0, 1 or 2");
        if (tokens.ndim() != 1) throw std::invalid_argument("tokens must be a flat sequence of ints");
        std::vector<int> ids(tokens.data(), tokens.data() + tokens.size());
        py::array_t<float> logits;
        float* dst = nullptr;
        if (output == 1) {
            logits = py::array_t<float>(model->config().vocab_size);
            dst = logits.mutable_data();
        }
        std::vector<TopK> parts;
        {
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(busy);
            root->step(ids.data(), (int)ids.size(), pos, (StepOutput)output, temperature, dst, &parts);
        }
        if (output == 1) return std::move(logits);
        if (output == 0) return py::none();
        py::list out;
        for (const TopK& t : parts) {  // each count checked by ClusterRoot::step as it came in
            py::array_t<int32_t> pid(t.count);
            py::array_t<float> plog(t.count);
            std::memcpy(pid.mutable_data(), t.ids, t.count * sizeof(int32_t));
            std::memcpy(plog.mutable_data(), t.logits, t.count * sizeof(float));
            out.append(py::make_tuple(pid, plog, t.log_norm));
        }
        return std::move(out);
    }

    std::string serve(py::object mesh_obj, bool q80) {
        PyMesh& m = mesh_obj.cast<PyMesh&>();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(busy);
        return serve_worker(*model, *m.mesh, q80);
    }

    PyTransformer(const py::dict& config, const py::object& plan, int n_threads, int max_seq_len, int max_batch) {
        if (n_threads < 1 || n_threads > 1024) throw std::invalid_argument("nthreads must be between 1 and 1024");
        if (max_seq_len < 1) throw std::invalid_argument("max_seq_len must be positive");
        if (max_batch < 1) throw std::invalid_argument("max_batch must be positive");
        const ModelConfig c = config_from(config);
        model = std::make_unique<Transformer>(c, plan_from(c, plan), n_threads, max_seq_len, max_batch);
    }

    void bind(const std::string& name, const py::buffer& buffer, size_t offset, int rows, int cols, size_t row_stride,
              int type) {
        if (type != (int)FloatType::F32 && type != (int)FloatType::Q40)
            throw std::invalid_argument("tensor " + name + ": unsupported float type " + std::to_string(type));
        py::buffer_info info = buffer.request();
        const size_t size = (size_t)info.size * info.itemsize;
        if (rows < 1 || cols < 1) throw std::invalid_argument("tensor " + name + ": empty shape");
        const size_t need = (size_t)(rows - 1) * row_stride + row_bytes((FloatType)type, cols);
        if (offset > size || need > size - offset)
            throw std::invalid_argument("tensor " + name + ": needs " + std::to_string(need) + " bytes at offset " +
                                        std::to_string(offset) + ", buffer has " + std::to_string(size));
        model->bind(name, static_cast<const uint8_t*>(info.ptr) + offset, rows, cols, row_stride, (FloatType)type);
        if (type != (int)FloatType::Q40) owners.push_back(buffer);  // Q40 matrices were copied (packed)
    }

    py::object forward(py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens, int pos, bool logits) {
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
            model->forward(ids.data(), n, pos, dst);
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

    py::class_<PyMesh>(m, "Mesh")
        .def(py::init<int, std::vector<int>, std::vector<std::string>, int, std::optional<std::vector<py::bytes>>>(),
             py::arg("node"), py::arg("fds"), py::arg("names"), py::arg("timeout_ms") = 10000,
             py::arg("keys") = py::none(),
             "Takes ownership of one connected socket per other node (-1 for this node). keys: None or [] for\n"
             "plain messages, else one per node (b'' for this node, 32 bytes shared with each other node):\n"
             "every message then carries a 16-byte keyed BLAKE2b tag over (sender u32 LE, that direction's\n"
             "message counter u64 LE, payload), and one that fails it is a NetworkError naming its sender.")
        .def_property_readonly("node", [](PyMesh& self) { return self.mesh->node(); })
        .def_property_readonly("size", [](PyMesh& self) { return self.mesh->size(); })
        .def("stats", [](PyMesh& self) {
            py::dict d;
            d["sent"] = self.mesh->stats.sent;
            d["received"] = self.mesh->stats.received;
            d["sync_seconds"] = self.mesh->stats.sync_seconds;
            d["mac_seconds"] = self.mesh->stats.mac_seconds;
            return d;
        });

    py::class_<PyTransformer>(m, "Transformer")
        .def(py::init<const py::dict&, const py::object&, int, int, int>(), py::arg("config"), py::arg("plan") = py::none(),
             py::arg("nthreads") = 1, py::arg("max_seq_len") = 4096, py::arg("max_batch") = 128)
        .def("bind", &PyTransformer::bind, py::arg("name"), py::arg("buffer"), py::arg("offset"), py::arg("rows"),
             py::arg("cols"), py::arg("row_stride"), py::arg("type"))
        .def("check_bound", [](PyTransformer& self) { self.model->check_bound(); })
        .def("forward", &PyTransformer::forward, py::arg("tokens"), py::arg("pos"), py::arg("logits") = true)
        .def("attach_root", &PyTransformer::attach_root, py::arg("mesh"), py::arg("q80"), py::arg("vocab_slices"),
             "Makes this the root of a cluster: steps then run on every node of the mesh.")
        .def("detach", &PyTransformer::detach, "Tells the workers the session ended and leaves the cluster.")
        .def("step", &PyTransformer::step, py::arg("tokens"), py::arg("pos"), py::arg("output"),
             py::arg("temperature") = 1.0f)
        .def("serve", &PyTransformer::serve, py::arg("mesh"), py::arg("q80"),
             "A worker's loop: runs the root's steps until the session ends; returns why it ended.")
        .def_property_readonly("max_seq_len", [](PyTransformer& self) { return self.model->max_seq_len(); })
        .def_property_readonly("max_batch", [](PyTransformer& self) { return self.model->max_batch(); })
        .def_property_readonly("nthreads", [](PyTransformer& self) { return self.model->n_threads(); })
        .def_property_readonly("vocab_slice", [](PyTransformer& self) {
            const SlicePlan& p = self.model->plan();
            return std::make_pair(p.vocab_begin, p.vocab_end);
        });
}
