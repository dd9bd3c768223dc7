// The Python module gally._core: thin bindings over the C++ engine. Bad input surfaces as
// ValueError (std::invalid_argument, std::length_error) or RuntimeError with a full sentence.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "forward.h"
#include "isa.h"
#include "model.h"
#include "parallel.h"
#include "safetensors.h"
#include "sequence.h"

namespace py = pybind11;
using namespace gally;

void add_testing_module(py::module_& m);  // bindings_testing.cpp

namespace {

template <class T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// OpenMP's runtime ends the process when it cannot start a team's threads (libgomp: "Thread
// creation failed"), e.g. under a memory or process limit. Starting as many plain threads, with
// the same default stack size, once at load turns that case into an exception.
void check_threads_start(int threads) {
  if (threads <= 0 || threads > MAX_THREADS)
    throw std::invalid_argument("threads must be in [1, " + std::to_string(MAX_THREADS) + "], got " +
                                std::to_string(threads));
  std::vector<pthread_t> started;
  int error = 0;
  for (int i = 1; i < threads && !error; ++i) {  // the calling thread is the team's first
    pthread_t t;
    error = pthread_create(
        &t, nullptr, [](void*) -> void* { return nullptr; }, nullptr);
    if (!error) started.push_back(t);
  }
  for (pthread_t t : started) pthread_join(t, nullptr);
  if (error)
    throw std::invalid_argument("threads=" + std::to_string(threads) + ": only " + std::to_string(started.size() + 1) +
                                " threads could be started (" + std::strerror(error) + "); pass fewer threads");
}

// One thread's read of [p, p + n) floats, n a multiple of 64: 16-byte vectors folded into four
// independent words (OR of XORs: no float latency on the way), each 256-byte step asking for the
// lines 2 KiB ahead. The memory, not the loop, must be the limit: on the 2-core test machine (Xeon,
// 2 threads) 16 scalar float sums read 23 GB/s where this reads 29-31 (AVX2 without the prefetch
// 30, with it 28-33) and gally's int8 decode of Llama-3.2-3B's shapes streamed 25.7.
typedef uint32_t ReadVec __attribute__((vector_size(16), may_alias));  // reads the floats as bits
uint32_t read_pass(const float* p, long n) {
  const ReadVec* v = (const ReadVec*)p;
  ReadVec a[4] = {};
  for (long i = 0; i < n / 4; i += 16) {
    for (int line = 0; line < 4; ++line) __builtin_prefetch((const char*)(v + i) + 2048 + 64 * line);
    for (int j = 0; j < 8; ++j) a[j % 4] |= v[i + j] ^ v[i + 8 + j];
  }
  const ReadVec t = a[0] | a[1] | a[2] | a[3];
  return t[0] ^ t[1] ^ t[2] ^ t[3];
}

// A buffer much larger than the caches, read with every thread: the best GB/s of a few passes is
// the machine's read bandwidth, the ceiling of a decode step; their mean, what a plain read got over
// those seconds on a host that others share. Made once and read as often as asked, so that passes
// can bracket a timed decode closely (filling 1 GiB takes longer than reading it). The buffer asks
// for huge pages, as the weight mappings do (safetensors.cpp): with 4 KiB pages the probe read
// 32-33 GB/s on the 2-core test machine while decode, from 2 MiB pages, streamed 37.
class ReadProbe {
 public:
  explicit ReadProbe(size_t bytes) {
    if (bytes == 0) throw std::invalid_argument("a read probe needs a buffer of at least 1 byte");
    constexpr size_t kHuge = size_t(2) << 20;
    count_ = (bytes / 4 + kHuge / 4 - 1) / (kHuge / 4) * (kHuge / 4);
    void* mem = nullptr;
    if (posix_memalign(&mem, kHuge, count_ * sizeof(float)) != 0) throw std::bad_alloc();
    buf_.reset((float*)mem);
#if defined(MADV_HUGEPAGE)
    ::madvise(mem, count_ * 4, MADV_HUGEPAGE);
#endif
    // Distinct contents per page, so that a host merging identical pages (KSM) cannot back the
    // buffer with a few physical pages that then read from cache. (On the 2-core test machine an
    // occasional probe still reads 57-64 GB/s against ~35; the cause is not established, so a
    // bandwidth fraction is only as good as its probe.)
    for (size_t i = 0; i < count_; ++i) buf_.get()[i] = float(uint32_t(i) * 2654435761u >> 8);
  }

  size_t bytes() const { return count_ * sizeof(float); }

  // Throws std::invalid_argument unless `threads` can start and `repeats` ≥ 1.
  static void check_passes(int threads, int repeats) {
    if (repeats < 1) throw std::invalid_argument("repeats must be at least 1, got " + std::to_string(repeats));
    check_threads_start(threads);
  }

  // The GB/s of each of `repeats` passes over the whole buffer with `threads` threads.
  std::vector<double> passes(int threads, int repeats) const {
    check_passes(threads, repeats);
    const long n = long(count_);  // a multiple of the 64 floats a step of read_pass reads
    std::vector<double> out;
    volatile uint32_t sink = 0;
    for (int r = 0; r < repeats; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      std::vector<uint32_t> totals(threads, 0);
      par::region(threads, [&] {
        const long steps = n / 64, s0 = steps * par::thread_id() / par::thread_count(),
                   s1 = steps * (par::thread_id() + 1) / par::thread_count();
        totals[par::thread_id()] = read_pass(buf_.get() + s0 * 64, (s1 - s0) * 64);
      });
      for (uint32_t t : totals) sink = sink ^ t;
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      out.push_back(double(n) * 4 / s / 1e9);
    }
    return out;
  }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> buf_;
  size_t count_ = 0;
};

// The shape of a KV cache of `dtype` ("f32" | "bf16" | "f16" | "int8") for the model.
KvShape kv_shape(const Model& model, const std::string& dtype) {
  const ModelConfig& c = model.config;
  return KvShape{c.num_hidden_layers, c.num_key_value_heads, c.head_dim, KV_BLOCK_ROWS, parse_kv_dtype(dtype)};
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "gally's C++ engine";

  m.def("available_isas", &available_isas);
  m.def("cpu_flags", &cpu_flags);
  m.def("kernel_sets_for", &kernel_sets_for, py::arg("flags"));
  m.def("selected_isa", []() { return selected_isa(); });
  m.def("select_isa", &select_isa, py::arg("name"));
  m.def("has_avx512bf16", &cpu_has_avx512bf16);
  m.def("openmp", []() { return par::kOpenMP; });
  m.def("parallel_backend", []() { return par::backend(); });  // "openmp" or "threads" (parallel.h)
  m.def("chunk_tokens", &chunk_tokens, py::arg("left"), py::arg("room"), py::arg("min_chunk"));
  m.def(
      "read_bandwidth",
      [](size_t bytes, int threads, int repeats) {
        ReadProbe::check_passes(threads, repeats);  // before the buffer is made and filled
        const std::vector<double> passes = ReadProbe(bytes).passes(threads, repeats);
        return *std::max_element(passes.begin(), passes.end());
      },
      py::arg("bytes"), py::arg("threads"), py::arg("repeats") = 5, py::call_guard<py::gil_scoped_release>());
  py::class_<ReadProbe>(m, "ReadProbe")
      .def(py::init<size_t>(), py::arg("bytes"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("bytes", &ReadProbe::bytes)
      .def("passes", &ReadProbe::passes, py::arg("threads"), py::arg("repeats"),
           py::call_guard<py::gil_scoped_release>());
  m.attr("MAX_THREADS") = MAX_THREADS;
  m.def("config_limits", []() {
    using L = ConfigLimits;
    py::dict d;
    d["hidden_size"] = L::hidden_size;
    d["intermediate_size"] = L::intermediate_size;
    d["num_hidden_layers"] = L::num_hidden_layers;
    d["num_attention_heads"] = L::num_attention_heads;
    d["head_dim"] = L::head_dim;
    d["vocab_size"] = L::vocab_size;
    d["attention_width"] = L::attention_width;
    d["matrix_elements"] = L::matrix_elements;
    d["max_context"] = L::max_context;
    d["kv_cache_bytes"] = L::kv_cache_bytes;
    return d;
  });

  py::class_<MappedFile, std::shared_ptr<MappedFile>>(m, "MappedFile")
      .def(py::init<const std::string&>(), py::arg("path"))
      .def_property_readonly("path", &MappedFile::path)
      .def_property_readonly("size", &MappedFile::size)
      .def("header", [](const MappedFile& f) { return py::bytes(f.header()); });

  py::class_<Tensor>(m, "Tensor")
      .def_readonly("name", &Tensor::name)
      .def_readonly("dtype", &Tensor::dtype)
      .def_readonly("shape", &Tensor::shape)
      .def_property_readonly("is_view", [](const Tensor& t) { return bool(t.file); })
      .def("numpy", [](py::object self) {
        // A read-only NumPy view that keeps the mapping alive; 16-bit floats come back as uint16.
        const Tensor& t = self.cast<const Tensor&>();
        std::string fmt;
        size_t es = safetensors_dtype_size(t.dtype);
        if (t.dtype == "F32") fmt = py::format_descriptor<float>::format();
        else if (t.dtype == "F64") fmt = py::format_descriptor<double>::format();
        else if (t.dtype == "F16" || t.dtype == "BF16" || t.dtype == "U16")
          fmt = py::format_descriptor<uint16_t>::format();
        else if (t.dtype == "I8") fmt = py::format_descriptor<int8_t>::format();
        else if (t.dtype == "U8" || t.dtype == "BOOL") fmt = py::format_descriptor<uint8_t>::format();
        else if (t.dtype == "I16") fmt = py::format_descriptor<int16_t>::format();
        else if (t.dtype == "I32") fmt = py::format_descriptor<int32_t>::format();
        else if (t.dtype == "U32") fmt = py::format_descriptor<uint32_t>::format();
        else if (t.dtype == "I64") fmt = py::format_descriptor<int64_t>::format();
        else if (t.dtype == "U64") fmt = py::format_descriptor<uint64_t>::format();
        else throw std::invalid_argument("tensor '" + t.name + "': no NumPy type for dtype " + t.dtype);
        std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.end()), strides(shape.size());
        py::ssize_t s = es;
        for (size_t i = shape.size(); i-- > 0;) {
          strides[i] = s;
          s *= shape[i];
        }
        py::array a(py::dtype(fmt), shape, strides, t.data, self);
        py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
        return a;
      });

  py::class_<TensorEntry>(m, "TensorEntry")
      .def(py::init([](std::string name, std::string dtype, std::vector<int64_t> shape, int64_t begin, int64_t end) {
             return TensorEntry{std::move(name), std::move(dtype), std::move(shape), begin, end};
           }),
           py::arg("name"), py::arg("dtype"), py::arg("shape"), py::arg("begin"), py::arg("end"));

  m.def("tensor_views", &tensor_views, py::arg("file"), py::arg("entries"));
  m.def(
      "tensor_from_numpy",
      [](const std::string& name, const std::string& dtype, py::array a) {
        // An owned copy, for tensors made in memory (quantized at load).
        const size_t es = safetensors_dtype_size(dtype);
        if (es == 0 || size_t(a.itemsize()) != es)
          throw std::invalid_argument("tensor '" + name + "': dtype " + dtype + " does not match the array");
        py::array c = py::array::ensure(a, py::array::c_style);
        Tensor t;
        t.name = name;
        t.dtype = dtype;
        t.shape.assign(c.shape(), c.shape() + c.ndim());
        t.owned =
            std::make_shared<std::vector<uint8_t>>((const uint8_t*)c.data(), (const uint8_t*)c.data() + c.nbytes());
        t.data = t.owned->data();
        return t;
      },
      py::arg("name"), py::arg("dtype"), py::arg("array"));

  py::class_<ModelConfig>(m, "ModelConfig")
      .def(py::init<>())
      .def_readwrite("hidden_size", &ModelConfig::hidden_size)
      .def_readwrite("intermediate_size", &ModelConfig::intermediate_size)
      .def_readwrite("num_hidden_layers", &ModelConfig::num_hidden_layers)
      .def_readwrite("num_attention_heads", &ModelConfig::num_attention_heads)
      .def_readwrite("num_key_value_heads", &ModelConfig::num_key_value_heads)
      .def_readwrite("head_dim", &ModelConfig::head_dim)
      .def_readwrite("vocab_size", &ModelConfig::vocab_size)
      .def_readwrite("rms_norm_eps", &ModelConfig::rms_norm_eps)
      .def_readwrite("tie_word_embeddings", &ModelConfig::tie_word_embeddings)
      .def_readwrite("qkv_bias", &ModelConfig::qkv_bias)
      .def_readwrite("o_bias", &ModelConfig::o_bias)
      .def_readwrite("mlp_bias", &ModelConfig::mlp_bias)
      .def_readwrite("inv_freq", &ModelConfig::inv_freq)
      .def_readwrite("attention_scale", &ModelConfig::attention_scale)
      .def_readwrite("sliding_window", &ModelConfig::sliding_window);

  py::class_<Model, std::shared_ptr<Model>>(m, "Model")
      .def(py::init([](const ModelConfig& c, const std::map<std::string, Tensor>& tensors, const std::string& dtype,
                       int threads) {
             check_threads_start(threads);
             return build_model(c, tensors, dtype, threads);
           }),
           py::arg("config"), py::arg("tensors"), py::arg("dtype"), py::arg("threads"),
           py::call_guard<py::gil_scoped_release>())
      .def_readonly("threads", &Model::threads)
      .def_readonly("weight_bytes", &Model::weight_bytes)
      .def_readonly("copied_bytes", &Model::copied_bytes)
      .def(
          "unembed",
          [](std::shared_ptr<Model> m, Array<float> hidden) {
            const ModelConfig& c = m->config;
            require(hidden.ndim() == 2 && hidden.shape(1) == c.hidden_size,
                    "hidden must have shape [n, hidden_size] = [n, " + std::to_string(c.hidden_size) + "]");
            const int n = int(hidden.shape(0));
            py::array_t<float> logits({n, c.vocab_size});
            float* out = logits.mutable_data();
            {
              py::gil_scoped_release release;
              Workspace ws(*m, std::max(1, std::min(n, MAX_BATCH_TOKENS)));
              unembed(*m, hidden.data(), n, out, ws);
            }
            return logits;
          },
          py::arg("hidden"))
      .def_property_readonly("dtypes", [](const Model& m) {
        std::map<std::string, int> counts;  // the layers' matrices per format
        for (const auto& L : m.layers)
          for (const Matrix* w : {&L.q_proj, &L.k_proj, &L.v_proj, &L.o_proj, &L.gate_proj, &L.up_proj, &L.down_proj})
            counts[dtype_name(w->dtype)] += 1;
        return counts;
      });

  py::register_exception<KvPoolExhausted>(m, "KvCacheFull", PyExc_RuntimeError);

  py::class_<KvPool, std::shared_ptr<KvPool>>(m, "KvPool")
      .def(py::init([](const Model& model, size_t max_blocks, const std::string& dtype) {
             return std::make_shared<KvPool>(kv_shape(model, dtype), max_blocks);
           }),
           py::arg("model"), py::arg("max_blocks"), py::arg("dtype") = "f32")
      .def_static(
          "bytes_per_block",
          [](const Model& model, const std::string& dtype) { return kv_shape(model, dtype).block_bytes(); },
          py::arg("model"), py::arg("dtype"))
      .def_property_readonly("dtype", [](const KvPool& p) { return std::string(dtype_name(p.shape().dtype)); })
      .def_property_readonly("block_rows", [](const KvPool& p) { return p.shape().block_rows; })
      .def_property_readonly("block_bytes", &KvPool::block_bytes)
      .def_property_readonly("max_blocks", &KvPool::max_blocks)
      .def_property_readonly("in_use", &KvPool::in_use)
      .def_property_readonly("allocated", &KvPool::allocated)
      .def("trim", &KvPool::trim);

  py::class_<Sequence>(m, "Sequence")
      .def(py::init([](std::shared_ptr<Model> model, std::shared_ptr<KvPool> pool, int max_context) {
             check_session_size(model->config, max_context);
             return new Sequence(std::move(model), std::move(pool), max_context);
           }),
           py::arg("model"), py::arg("pool"), py::arg("max_context"))
      .def_property_readonly("position", &Sequence::position)
      .def_property_readonly("max_context", &Sequence::max_context)
      .def_property_readonly("blocks", [](Sequence& s) { return s.cache().blocks(); })
      .def("truncate", &Sequence::truncate, py::arg("position"))
      .def("fork", &Sequence::fork, py::arg("position"));

  py::class_<Runner>(m, "Runner")
      .def(py::init(
               [](std::shared_ptr<Model> model, int max_tokens) { return new Runner(std::move(model), max_tokens); }),
           py::arg("model"), py::arg("max_tokens"))
      .def_property_readonly("max_tokens", &Runner::max_tokens)
      .def_property_readonly("gemm_min_tokens", &Runner::gemm_min_tokens)
      .def(
          "forward",
          [](Runner& r, Sequence& s, Array<int32_t> tokens, py::array_t<float, py::array::c_style> logits,
             bool all_logits, py::object hidden, py::object attention, py::object mlp, py::object squares) {
            // One sequence; logits [vocab], or [n, vocab] with all_logits.
            const ModelConfig& c = s.model().config;
            require(tokens.ndim() == 1, "token_ids must be one-dimensional");
            const int n = int(tokens.shape(0));
            const size_t want = size_t(all_logits ? n : 1) * c.vocab_size;
            require(size_t(logits.size()) == want, "logits buffer must hold " + std::to_string(want) + " floats");
            Record rec;
            const size_t ctx = size_t(s.position()) + n;
            py::array_t<float, py::array::c_style> h, a, f;
            py::array_t<double, py::array::c_style> sq;
            if (!hidden.is_none()) {
              h = hidden.cast<py::array_t<float, py::array::c_style>>();
              require(size_t(h.size()) == size_t(c.num_hidden_layers + 1) * n * c.hidden_size,
                      "hidden_states buffer must have shape [layers + 1, n, hidden]");
              rec.hidden = h.mutable_data();
            }
            if (!attention.is_none()) {
              a = attention.cast<py::array_t<float, py::array::c_style>>();
              require(size_t(a.size()) == size_t(c.num_hidden_layers) * c.num_attention_heads * n * ctx,
                      "attentions buffer must have shape [layers, heads, n, position + n]");
              rec.attention = a.mutable_data();
            }
            if (!mlp.is_none()) {
              f = mlp.cast<py::array_t<float, py::array::c_style>>();
              require(size_t(f.size()) == size_t(c.num_hidden_layers) * n * c.intermediate_size,
                      "mlp_activations buffer must have shape [layers, n, intermediate]");
              rec.mlp = f.mutable_data();
            }
            if (!squares.is_none()) {
              sq = squares.cast<py::array_t<double, py::array::c_style>>();
              require(size_t(sq.size()) == size_t(c.num_hidden_layers) * Record::squares_width(c),
                      "input_squares buffer must have shape [layers, 2 * hidden + heads * head_dim + intermediate]");
              rec.squares = sq.mutable_data();
            }
            float* out = logits.mutable_data();
            // The ids are copied before the GIL is released: another thread may change the caller's array.
            const std::vector<int32_t> ids(tokens.data(), tokens.data() + n);
            Sequence* seq = &s;
            py::gil_scoped_release release;
            r.forward(&seq, 1, ids.data(), &n, out, all_logits, rec);
          },
          py::arg("sequence"), py::arg("tokens"), py::arg("logits"), py::arg("all_logits") = false,
          py::arg("hidden_states") = py::none(), py::arg("attentions") = py::none(),
          py::arg("mlp_activations") = py::none(), py::arg("input_squares") = py::none())
      .def(
          "forward_batch",
          [](Runner& r, const std::vector<Sequence*>& seqs, Array<int32_t> tokens, Array<int32_t> counts,
             py::array_t<float, py::array::c_style> logits) {
            // Sequence i takes the next counts[i] tokens; logits [n_seqs, vocab], each one's last token.
            const int n_seqs = int(seqs.size());
            require(n_seqs > 0, "no sequences to run");
            require(counts.ndim() == 1 && counts.shape(0) == n_seqs, "counts must hold one count per sequence");
            require(tokens.ndim() == 1, "token_ids must be one-dimensional");
            long total = 0;
            for (int i = 0; i < n_seqs; ++i) total += counts.data()[i];
            require(total == tokens.shape(0), "counts must add up to the number of tokens");
            require(size_t(logits.size()) == size_t(n_seqs) * seqs.at(0)->model().config.vocab_size,
                    "logits buffer must have shape [sequences, vocab]");
            const std::vector<int32_t> ids(tokens.data(), tokens.data() + total),
                n(counts.data(), counts.data() + n_seqs);
            float* out = logits.mutable_data();
            py::gil_scoped_release release;
            r.forward(seqs.data(), n_seqs, ids.data(), n.data(), out, false, Record{});
          },
          py::arg("sequences"), py::arg("tokens"), py::arg("counts"), py::arg("logits"));

  add_testing_module(m);
}
