// The Python module gally._core: thin bindings over the C++ engine. Bad input surfaces as
// ValueError (std::invalid_argument, std::length_error) or RuntimeError with a full sentence.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "isa.h"
#include "model.h"
#include "safetensors.h"
#include "session.h"

namespace py = pybind11;
using namespace gally;

namespace {

template <class T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

const Kernels& kernels_named(const std::string& isa) {
  const Kernels* k = kernels_for(isa);
  if (!k) throw std::invalid_argument("instruction set '" + isa + "' is not available on this CPU");
  return *k;
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// Reads a buffer much larger than the caches with every thread and returns the best GB/s of
// `repeats` passes: the machine's read bandwidth, the ceiling of a decode step. The buffer asks
// for huge pages, as the weight mappings do (safetensors.cpp): with 4 KiB pages the probe read
// 32-33 GB/s on the 2-core test machine while decode, from 2 MiB pages, streamed 37.
double read_bandwidth(size_t bytes, int threads, int repeats) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t count = (bytes / 4 + kHuge / 4 - 1) / (kHuge / 4) * (kHuge / 4);
  void* mem = nullptr;
  if (posix_memalign(&mem, kHuge, count * 4) != 0) throw std::bad_alloc();
  std::unique_ptr<float, decltype(&std::free)> owner((float*)mem, &std::free);
#if defined(MADV_HUGEPAGE)
  ::madvise(mem, count * 4, MADV_HUGEPAGE);
#endif
  float* buf = owner.get();
  // Distinct contents per page, so that a host merging identical pages (KSM) cannot back the
  // buffer with a few physical pages that then read from cache. (On the 2-core test machine an
  // occasional probe still reads 57-64 GB/s against ~35; the cause is not established, so a block's
  // bandwidth fraction is only as good as its probe.)
  for (size_t i = 0; i < count; ++i) buf[i] = float(uint32_t(i) * 2654435761u >> 8);
  const long n = long(count);  // a multiple of the 64 floats a step of the loop below reads
  double best = 0;
  volatile float sink = 0;
  for (int r = 0; r < repeats; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    float total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
      float lane[16] = {0};  // independent lanes across the whole pass: no dependency chain
#pragma omp for schedule(static)
      for (long i = 0; i < n; i += 64)
        for (int j = 0; j < 64; j += 16)
          for (int l = 0; l < 16; ++l) lane[l] += buf[i + j + l];
      for (int l = 0; l < 16; ++l) total += lane[l];
    }
    sink = sink + total;
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(n) * 4 / s / 1e9);
  }
  return best;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "gally's C++ engine";

  m.def("available_isas", &available_isas);
  m.def("selected_isa", []() { return selected_isa(); });
  m.def("select_isa", &select_isa, py::arg("name"));
  m.def("has_avx512bf16", &cpu_has_avx512bf16);
  m.def("openmp", []() {
#if defined(_OPENMP)
    return true;
#else
    return false;
#endif
  });
  m.def("read_bandwidth", &read_bandwidth, py::arg("bytes"), py::arg("threads"), py::arg("repeats") = 5,
        py::call_guard<py::gil_scoped_release>());

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
        else if (t.dtype == "F16" || t.dtype == "BF16" || t.dtype == "U16") fmt = py::format_descriptor<uint16_t>::format();
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
        for (size_t i = shape.size(); i-- > 0;) { strides[i] = s; s *= shape[i]; }
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
        t.owned = std::make_shared<std::vector<uint8_t>>((const uint8_t*)c.data(), (const uint8_t*)c.data() + c.nbytes());
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
      .def(py::init(&build_model), py::arg("config"), py::arg("tensors"), py::arg("dtype"), py::arg("threads"),
           py::call_guard<py::gil_scoped_release>())
      .def_readonly("threads", &Model::threads)
      .def_readonly("weight_bytes", &Model::weight_bytes)
      .def_readonly("copied_bytes", &Model::copied_bytes)
      .def_property_readonly("dtypes", [](const Model& m) {
        std::map<std::string, int> counts;  // the layers' matrices per format
        for (const auto& L : m.layers)
          for (const Matrix* w : {&L.q_proj, &L.k_proj, &L.v_proj, &L.o_proj, &L.gate_proj, &L.up_proj, &L.down_proj})
            counts[dtype_name(w->dtype)] += 1;
        return counts;
      });

  py::class_<Session>(m, "Session")
      .def(py::init([](std::shared_ptr<Model> model, int max_context) {
             return new Session(std::move(model), max_context);
           }),
           py::arg("model"), py::arg("max_context"))
      .def_property_readonly("position", &Session::position)
      .def_property_readonly("max_context", &Session::max_context)
      .def("truncate", &Session::truncate, py::arg("position"))
      .def(
          "forward",
          [](Session& s, Array<int32_t> tokens, py::array_t<float, py::array::c_style> logits, bool all_logits,
             py::object hidden, py::object attention) {
            const ModelConfig& c = s.model().config;
            require(tokens.ndim() == 1, "token_ids must be one-dimensional");
            const int n = int(tokens.shape(0));
            const size_t want = size_t(all_logits ? n : 1) * c.vocab_size;
            require(size_t(logits.size()) == want, "logits buffer must hold " + std::to_string(want) + " floats");
            Record rec;
            const size_t ctx = size_t(s.position()) + n;
            py::array_t<float, py::array::c_style> h, a;
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
            float* out = logits.mutable_data();
            const int32_t* ids = tokens.data();
            py::gil_scoped_release release;
            s.forward(ids, n, out, all_logits, rec);
          },
          py::arg("tokens"), py::arg("logits"), py::arg("all_logits") = false, py::arg("hidden_states") = py::none(),
          py::arg("attentions") = py::none());

  // Single kernels, for the tests that hold each SIMD kernel against its scalar twin.
  m.def(
      "kernel_matmul",
      [](const std::string& isa, Array<float> x, py::array W, const std::string& wtype, py::object bias, Array<float> y,
         bool accumulate, int r0, int r1, py::object scales, py::object mins) {
        // W [n_out, n_in] in wtype; for int8 int8 [n_out, n_in] and for int4 uint8 [n_out, n_in/2], with float16
        // scales (and int4 mins) [n_out, n_in/32] given as uint16.
        const Kernels& k = kernels_named(isa);
        const DType t = wtype == "int8" ? DType::Q8 : wtype == "int4" ? DType::Q4 : parse_dtype(wtype);
        const bool quantized = is_quantized(t);
        require(W.ndim() == 2 && x.ndim() == 2 && y.ndim() == 2, "x, W, y must be 2-D");
        const int n_out = int(W.shape(0)), n_in = int(x.shape(1)), n_tok = int(x.shape(0));
        require(W.itemsize() == (quantized ? 1 : py::ssize_t(dtype_size(t))) && (W.flags() & py::array::c_style),
                "W has the wrong element size or layout");
        require(W.shape(1) == (t == DType::Q4 ? n_in / 2 : n_in) && y.shape(0) == n_tok && y.shape(1) == n_out,
                "shapes disagree");
        require(0 <= r0 && r0 <= r1 && r1 <= n_out, "bad row range");
        WeightsRef w{W.data(), t};
        Array<uint16_t> s, m;
        if (quantized) {
          require(n_in % QGROUP == 0 && !scales.is_none() && (t == DType::Q8 || !mins.is_none()),
                  "quantized W needs n_in % 32 == 0 and its scales (and mins for int4)");
          s = scales.cast<Array<uint16_t>>();
          require(s.size() == n_out * (n_in / QGROUP), "scales must be [n_out, n_in/32]");
          w.scales = s.data();
          if (t == DType::Q4) {
            m = mins.cast<Array<uint16_t>>();
            require(m.size() == s.size(), "mins must be [n_out, n_in/32]");
            w.mins = m.data();
          }
        }
        Array<float> b;
        if (!bias.is_none()) {
          b = bias.cast<Array<float>>();
          require(b.size() == n_out, "bias must have n_out elements");
        }
        auto yv = y.mutable_data();
        k.matmul(x.data(), w, bias.is_none() ? nullptr : b.data(), yv, n_tok, n_in, n_out, r0, r1, accumulate);
        return y;
      },
      py::arg("isa"), py::arg("x"), py::arg("W"), py::arg("wtype"), py::arg("bias"), py::arg("y"),
      py::arg("accumulate"), py::arg("r0"), py::arg("r1"), py::arg("scales") = py::none(),
      py::arg("mins") = py::none());
  m.def("kernel_matmul_many", [](const std::string& isa, Array<float> x, py::list jobs) {
    // jobs: (W, wtype, y, r0, r1, accumulate) with float weights; each y [n_tok, W.rows] updated in place
    const Kernels& k = kernels_named(isa);
    require(x.ndim() == 2, "x must be 2-D");
    const int n_tok = int(x.shape(0)), n_in = int(x.shape(1));
    std::vector<MatmulOut> outs;
    std::vector<py::array> keep;
    for (const py::handle& job : jobs) {
      auto t = job.cast<py::tuple>();
      py::array W = t[0].cast<py::array>();
      const DType dt = parse_dtype(t[1].cast<std::string>());
      Array<float> y = t[2].cast<Array<float>>();
      const int r0 = t[3].cast<int>(), r1 = t[4].cast<int>();
      require(W.ndim() == 2 && W.shape(1) == n_in && W.itemsize() == py::ssize_t(dtype_size(dt)) &&
                  (W.flags() & py::array::c_style),
              "W must be [rows, n_in] in wtype");
      require(y.ndim() == 2 && y.shape(0) == n_tok && y.shape(1) == W.shape(0) && 0 <= r0 && r0 <= r1 &&
                  r1 <= W.shape(0),
              "y or the row range has the wrong shape");
      outs.push_back({WeightsRef{W.data(), dt}, nullptr, y.mutable_data(), int(W.shape(0)), r0, r1, t[5].cast<bool>()});
      keep.push_back(W);
      keep.push_back(y);
    }
    k.matmul_many(x.data(), n_tok, n_in, outs.data(), int(outs.size()));
  });
  m.def("kernel_quantize_rows", [](const std::string& isa, Array<float> x) {
    require(x.ndim() == 2 && x.shape(1) % QGROUP == 0, "x must be [n, a multiple of 32]");
    const int n = int(x.shape(0)), n_in = int(x.shape(1));
    Array<int16_t> q({n, n_in});
    Array<float> s({n, n_in / QGROUP}), sum({n, n_in / QGROUP});
    kernels_named(isa).quantize_rows(x.data(), n, n_in, q.mutable_data(), s.mutable_data(), sum.mutable_data());
    return py::make_tuple(q, s, sum);
  });
  m.def("kernel_matmul_quantized", [](const std::string& isa, Array<int16_t> xq, Array<float> xs, Array<float> xsum,
                                      py::array Wq, Array<uint16_t> Ws, py::object Wm, Array<float> y, int r0, int r1) {
    // Wq int8 [n_out, n_in] (int8 weights) or uint8 [n_out, n_in/2] (int4, with Wm)
    const Kernels& k = kernels_named(isa);
    require(xq.ndim() == 2, "xq must be [n_tok, n_in]");
    const int n_tok = int(xq.shape(0)), n_in = int(xq.shape(1)), n_out = int(Wq.shape(0));
    const bool q4 = !Wm.is_none();
    require(Wq.ndim() == 2 && Wq.itemsize() == 1 && (Wq.flags() & py::array::c_style) &&
                Wq.shape(1) == (q4 ? n_in / 2 : n_in),
            "Wq has the wrong shape or layout");
    require(Ws.ndim() == 2 && Ws.shape(0) == n_out && Ws.shape(1) == n_in / QGROUP, "Ws must be [n_out, n_in/32]");
    require(y.ndim() == 2 && y.shape(0) == n_tok && y.shape(1) == n_out && 0 <= r0 && r0 <= r1 && r1 <= n_out,
            "y or the row range has the wrong shape");
    require(xs.size() == n_tok * (n_in / QGROUP) && xsum.size() == xs.size(), "xs, xsum must be [n, n_in/32]");
    float* out = y.mutable_data();
    if (q4) {
      Array<uint16_t> m = Wm.cast<Array<uint16_t>>();
      require(m.size() == Ws.size(), "Wm must be [n_out, n_in/32]");
      k.matmul_q4(xq.data(), xs.data(), xsum.data(), (const uint8_t*)Wq.data(), Ws.data(), m.data(), nullptr, out,
                  n_tok, n_in, n_out, r0, r1, false);
    } else {
      k.matmul_q8(xq.data(), xs.data(), (const int8_t*)Wq.data(), Ws.data(), nullptr, out, n_tok, n_in, n_out, r0, r1,
                  false);
    }
    return y;
  });
  m.def("kernel_rmsnorm", [](const std::string& isa, Array<float> x, Array<float> w, float eps) {
    require(x.size() == w.size(), "x and w differ in size");
    Array<float> out(x.size());
    kernels_named(isa).rmsnorm(out.mutable_data(), x.data(), w.data(), int(x.size()), eps);
    return out;
  });
  m.def("kernel_rope", [](const std::string& isa, Array<float> v, Array<float> cos, Array<float> sin) {
    require(v.size() % 2 == 0 && cos.size() == v.size() / 2 && sin.size() == cos.size(), "rope sizes disagree");
    Array<float> out(v.size());
    std::memcpy(out.mutable_data(), v.data(), v.size() * 4);
    kernels_named(isa).rope(out.mutable_data(), cos.data(), sin.data(), int(v.size()));
    return out;
  });
  m.def("kernel_attention", [](const std::string& isa, Array<float> q, Array<float> K, Array<float> V, float scale) {
    require(K.ndim() == 2 && V.ndim() == 2 && K.shape(0) == V.shape(0) && K.shape(1) == q.size() &&
                V.shape(1) == q.size() && K.shape(0) > 0,
            "attention shapes disagree");
    const int n = int(K.shape(0)), d = int(q.size());
    Array<float> out(d), probs(n);
    kernels_named(isa).attention(q.data(), K.data(), V.data(), n, d, d, scale, probs.mutable_data(), out.mutable_data());
    return py::make_tuple(out, probs);
  });
  m.def("kernel_attention_causal", [](const std::string& isa, Array<float> Q, Array<float> K, Array<float> V,
                                      int ctx0, float scale, bool bf16) {
    // Q [nq, d]: query i sees keys [0, ctx0 + i) of K, V [ctx0 + nq − 1, d]
    require(Q.ndim() == 2 && K.ndim() == 2 && V.ndim() == 2 && Q.shape(0) > 0 && ctx0 > 0, "bad shapes");
    const int nq = int(Q.shape(0)), d = int(Q.shape(1)), n = ctx0 + nq - 1;
    require(K.shape(0) == n && V.shape(0) == n && K.shape(1) == d && V.shape(1) == d, "attention shapes disagree");
    Array<float> out({nq, d}), probs({nq, n});
    std::fill(probs.mutable_data(), probs.mutable_data() + probs.size(), -1.0f);  // untouched past each row's keys
    const Kernels& k = kernels_named(isa);
    if (bf16) {  // the avx512bf16 set's variant for bf16 and quantized models
      require(k.attention_causal_bf16 != nullptr, std::string(k.name) + " has no bf16 attention");
      require(d % 32 == 0, "the bf16 attention needs d a multiple of 32");
    }
    std::vector<float> scratch(bf16 ? attention_bf16_scratch_floats(n, d) : attention_scratch_floats(n, d));
    (bf16 ? k.attention_causal_bf16 : k.attention_causal)(Q.data(), d, nq, ctx0, K.data(), V.data(), d, d, scale,
                                                          scratch.data(), out.mutable_data(), d, probs.mutable_data(), n);
    return py::make_tuple(out, probs);
  }, py::arg("isa"), py::arg("Q"), py::arg("K"), py::arg("V"), py::arg("ctx0"), py::arg("scale"), py::arg("bf16") = false);
  m.def("kernel_silu_mul", [](const std::string& isa, Array<float> g, Array<float> u) {
    require(g.size() == u.size(), "g and u differ in size");
    Array<float> out(g.size());
    std::memcpy(out.mutable_data(), g.data(), g.size() * 4);
    kernels_named(isa).silu_mul(out.mutable_data(), u.data(), int(g.size()));
    return out;
  });
}
