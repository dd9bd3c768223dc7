// gally._core.testing: single kernels and other internals, for the tests that hold each SIMD
// kernel against its scalar twin and NumPy. Not part of the library's interface.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#include "isa.h"
#include "kernels/kernels.h"
#include "kernels/paged_kv.h"
#include "kv_cache.h"
#include "model.h"
#include "parallel.h"

namespace py = pybind11;
using namespace gally;

namespace {

template <class T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// K, V [n, d] (one KV head) or [kv_heads, n, d] as a paged cache in `dtype` (kernels/paged_kv.h).
PagedKv paged_kv(const Array<float>& K, const Array<float>& V, int block_rows, const std::string& dtype) {
  require((K.ndim() == 2 || K.ndim() == 3) && V.ndim() == K.ndim(), "K, V must be [n, d] or [kv_heads, n, d]");
  for (int i = 0; i < K.ndim(); ++i) require(K.shape(i) == V.shape(i), "K and V shapes disagree");
  const long g = K.ndim() == 3 ? K.shape(0) : 1;
  return PagedKv(K.data(), V.data(), g, K.shape(K.ndim() - 2), K.shape(K.ndim() - 1), block_rows,
                 parse_kv_dtype(dtype));
}

// A set this CPU runs, or "generic-bf16", the scalar twin of "avx512bf16".
const Kernels& kernels_named(const std::string& isa) {
  if (isa == "generic-bf16") return kernels_generic_bf16;
  const Kernels* k = kernels_for(isa);
  if (!k) throw std::invalid_argument("instruction set '" + isa + "' is not available on this CPU");
  return *k;
}

// A weight matrix argument: W [n_out, n_in] in wtype ("f32", "bf16" or "f16" as uint16, "int8" as
// int8, "int4-v1" and "int4" as uint8 [n_out, n_in/2]) with float16 scales (and int4 mins)
// [n_out, n_in/32]; for "int4" (Q4K) scales and mins [super-blocks] and codes uint8
// [super-blocks · 12] (kernels.h).
DType weight_type(const std::string& wtype) {
  if (wtype == "int8") return DType::Q8;
  if (wtype == "int4-v1") return DType::Q4;
  if (wtype == "int4") return DType::Q4K;
  return parse_dtype(wtype);
}

struct Weights {
  WeightsRef ref;
  int rows;
  py::array W;
  Array<uint16_t> scales, mins;
  Array<uint8_t> codes;

  Weights(py::array W_, const std::string& wtype, int n_in, py::object s, py::object m, py::object c = py::none())
      : W(W_) {
    const DType t = weight_type(wtype);
    const bool quantized = is_quantized(t);
    require(W.ndim() == 2, "W must be 2-D");
    rows = int(W.shape(0));
    require(W.itemsize() == (quantized ? 1 : py::ssize_t(dtype_size(t))) && (W.flags() & py::array::c_style),
            "W has the wrong element size or layout");
    require(W.shape(1) == (t == DType::Q4 || t == DType::Q4K ? n_in / 2 : n_in), "W's columns disagree with x");
    ref = WeightsRef{W.data(), t};
    if (!quantized) return;
    require(n_in % QGROUP == 0 && !s.is_none() && (t == DType::Q8 || !m.is_none()) && (t != DType::Q4K || !c.is_none()),
            "quantized W needs n_in % 32 == 0 and its scales (and mins for int4, codes for int4 v2)");
    const long blocks = t == DType::Q4K ? super_blocks(long(rows) * (n_in / QGROUP)) : long(rows) * (n_in / QGROUP);
    scales = s.cast<Array<uint16_t>>();
    require(scales.size() == blocks, "scales must be [n_out, n_in/32] (int4: [super-blocks])");
    ref.scales = scales.data();
    if (t != DType::Q8) {
      mins = m.cast<Array<uint16_t>>();
      require(mins.size() == scales.size(), "mins must be shaped as scales");
      ref.mins = mins.data();
    }
    if (t == DType::Q4K) {
      codes = c.cast<Array<uint8_t>>();
      require(codes.size() == blocks * QK_CODE_BYTES, "codes must be [super-blocks · 12]");
      ref.codes = codes.data();
    }
  }
};

}  // namespace

void add_testing_module(py::module_& m) {
  py::module_ t = m.def_submodule("testing", "gally's internals, for its tests");
  t.def(
      "kernel_matmul",
      [](const std::string& isa, Array<float> x, py::array W, const std::string& wtype, py::object bias, Array<float> y,
         bool accumulate, int r0, int r1, py::object scales, py::object mins, py::object codes, bool rowwise) {
        // W [n_out, n_in] in wtype, with its scales, mins and codes as the Weights above (float16 as uint16)
        const Kernels& k = kernels_named(isa);
        require(x.ndim() == 2 && y.ndim() == 2, "x, y must be 2-D");
        const int n_in = int(x.shape(1)), n_tok = int(x.shape(0));
        const Weights w(W, wtype, n_in, scales, mins, codes);
        const int n_out = w.rows;
        require(y.shape(0) == n_tok && y.shape(1) == n_out, "shapes disagree");
        require(0 <= r0 && r0 <= r1 && r1 <= n_out, "bad row range");
        Array<float> b;
        if (!bias.is_none()) {
          b = bias.cast<Array<float>>();
          require(b.size() == n_out, "bias must have n_out elements");
        }
        auto yv = y.mutable_data();
        // rowwise: Kernels::gemv, the row-by-row kernel of decode steps, whatever n_tok
        (rowwise ? k.gemv : k.matmul)(x.data(), w.ref, bias.is_none() ? nullptr : b.data(), yv, n_tok, n_in, n_out, r0,
                                      r1, accumulate);
        return y;
      },
      py::arg("isa"), py::arg("x"), py::arg("W"), py::arg("wtype"), py::arg("bias"), py::arg("y"),
      py::arg("accumulate"), py::arg("r0"), py::arg("r1"), py::arg("scales") = py::none(), py::arg("mins") = py::none(),
      py::arg("codes") = py::none(), py::arg("rowwise") = false);
  t.def(
      "kernel_pack",
      [](const std::string& isa, Array<float> x) {
        // x [n_tok, n_in] in the set's packed layout (Kernels::pack), as uint32 words
        const Kernels& k = kernels_named(isa);
        require(k.pack != nullptr, std::string(k.name) + " has no packed layout");
        require(x.ndim() == 2, "x must be 2-D");
        const int n_tok = int(x.shape(0)), n_in = int(x.shape(1));
        py::array_t<uint32_t> xt(k.packed_size(n_tok, n_in));
        k.pack(x.data(), n_tok, n_in, 0, (n_tok + GEMM_SPLIT_TOKENS - 1) / GEMM_SPLIT_TOKENS, xt.mutable_data());
        return xt;
      },
      py::arg("isa"), py::arg("x"));
  t.def(
      "kernel_matmul_packed",
      [](const std::string& isa, Array<float> x, py::array W, const std::string& wtype, py::object scales,
         py::object mins, py::object codes) {
        // y = x · Wᵀ through the set's packed layout: pack, then matmul_many_packed
        const Kernels& k = kernels_named(isa);
        require(k.pack != nullptr, std::string(k.name) + " has no packed layout");
        require(x.ndim() == 2, "x must be 2-D");
        const int n_tok = int(x.shape(0)), n_in = int(x.shape(1));
        const Weights w(W, wtype, n_in, scales, mins, codes);
        std::vector<uint32_t> xt(k.packed_size(n_tok, n_in));
        k.pack(x.data(), n_tok, n_in, 0, (n_tok + GEMM_SPLIT_TOKENS - 1) / GEMM_SPLIT_TOKENS, xt.data());
        Array<float> y({n_tok, w.rows});
        const MatmulOut out{w.ref, nullptr, y.mutable_data(), w.rows, 0, w.rows, false};
        k.matmul_many_packed(xt.data(), x.data(), n_tok, n_in, &out, 1);
        return y;
      },
      py::arg("isa"), py::arg("x"), py::arg("W"), py::arg("wtype"), py::arg("scales") = py::none(),
      py::arg("mins") = py::none(), py::arg("codes") = py::none());
  t.def("kernel_matmul_many", [](const std::string& isa, Array<float> x, py::list jobs) {
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
      require(
          y.ndim() == 2 && y.shape(0) == n_tok && y.shape(1) == W.shape(0) && 0 <= r0 && r0 <= r1 && r1 <= W.shape(0),
          "y or the row range has the wrong shape");
      outs.push_back({WeightsRef{W.data(), dt}, nullptr, y.mutable_data(), int(W.shape(0)), r0, r1, t[5].cast<bool>()});
      keep.push_back(W);
      keep.push_back(y);
    }
    k.matmul_many(x.data(), n_tok, n_in, outs.data(), int(outs.size()));
  });
  t.def("kernel_quantize_rows", [](const std::string& isa, Array<float> x) {
    require(x.ndim() == 2 && x.shape(1) % QGROUP == 0, "x must be [n, a multiple of 32]");
    const int n = int(x.shape(0)), n_in = int(x.shape(1));
    Array<int16_t> q({n, n_in});
    Array<float> s({n, n_in / QGROUP}), sum({n, n_in / QGROUP});
    kernels_named(isa).quantize_rows(x.data(), n, n_in, q.mutable_data(), s.mutable_data(), sum.mutable_data());
    return py::make_tuple(q, s, sum);
  });
  t.def(
      "kernel_matmul_quantized",
      [](const std::string& isa, Array<int16_t> xq, Array<float> xs, Array<float> xsum, py::array Wq,
         Array<uint16_t> Ws, py::object Wm, Array<float> y, int r0, int r1, py::object codes, bool gemm,
         py::object bias, bool accumulate) {
        // Wq int8 [n_out, n_in] (int8 weights) or uint8 [n_out, n_in/2] (int4 v1 with Wm; int4 v2 with Wm and
        // codes, Ws and Wm then the super-blocks' d and dmin). gemm: Kernels::gemm_q rather than the row-wise
        // matmul_q8/q4/q4k.
        const Kernels& k = kernels_named(isa);
        require(!gemm || k.gemm_q, std::string(k.name) + " has no gemm_q");
        require(xq.ndim() == 2, "xq must be [n_tok, n_in]");
        const int n_tok = int(xq.shape(0)), n_in = int(xq.shape(1)), n_out = int(Wq.shape(0));
        const bool q4 = !Wm.is_none(), q4k = !codes.is_none();
        require(q4 || !q4k, "int4 v2 weights need Wm");
        require(Wq.ndim() == 2 && Wq.itemsize() == 1 && (Wq.flags() & py::array::c_style) &&
                    Wq.shape(1) == (q4 ? n_in / 2 : n_in),
                "Wq has the wrong shape or layout");
        const long blocks = super_blocks(long(n_out) * (n_in / QGROUP));
        require(q4k ? Ws.ndim() == 1 && Ws.shape(0) == blocks
                    : Ws.ndim() == 2 && Ws.shape(0) == n_out && Ws.shape(1) == n_in / QGROUP,
                "Ws must be [n_out, n_in/32] (int4 v2: [super-blocks])");
        require(y.ndim() == 2 && y.shape(0) == n_tok && y.shape(1) == n_out && 0 <= r0 && r0 <= r1 && r1 <= n_out,
                "y or the row range has the wrong shape");
        require(xs.size() == n_tok * (n_in / QGROUP) && xsum.size() == xs.size(), "xs, xsum must be [n, n_in/32]");
        Array<float> b;
        if (!bias.is_none()) {
          b = bias.cast<Array<float>>();
          require(b.size() == n_out, "bias must have n_out elements");
        }
        Array<uint16_t> m;
        Array<uint8_t> c;
        if (q4) {
          m = Wm.cast<Array<uint16_t>>();
          require(m.size() == Ws.size(), "Wm must be shaped as Ws");
        }
        if (q4k) {
          c = codes.cast<Array<uint8_t>>();
          require(c.size() == Ws.size() * QK_CODE_BYTES, "codes must be [super-blocks · 12]");
        }
        const WeightsRef W{Wq.data(),
                           q4k  ? DType::Q4K
                           : q4 ? DType::Q4
                                : DType::Q8,
                           Ws.data(), q4 ? m.data() : nullptr, q4k ? c.data() : nullptr};
        const float* bp = bias.is_none() ? nullptr : b.data();
        float* out = y.mutable_data();
        if (gemm) k.gemm_q(xq.data(), xs.data(), xsum.data(), W, bp, out, n_tok, n_in, n_out, r0, r1, accumulate);
        else if (q4k)
          k.matmul_q4k(xq.data(), xs.data(), xsum.data(), W, bp, out, n_tok, n_in, n_out, r0, r1, accumulate);
        else if (q4)
          k.matmul_q4(xq.data(), xs.data(), xsum.data(), (const uint8_t*)Wq.data(), Ws.data(), m.data(), bp, out, n_tok,
                      n_in, n_out, r0, r1, accumulate);
        else
          k.matmul_q8(xq.data(), xs.data(), (const int8_t*)Wq.data(), Ws.data(), bp, out, n_tok, n_in, n_out, r0, r1,
                      accumulate);
        return y;
      },
      py::arg("isa"), py::arg("xq"), py::arg("xs"), py::arg("xsum"), py::arg("Wq"), py::arg("Ws"), py::arg("Wm"),
      py::arg("y"), py::arg("r0"), py::arg("r1"), py::arg("codes") = py::none(), py::arg("gemm") = false,
      py::arg("bias") = py::none(), py::arg("accumulate") = false);
  t.def("kernel_has_gemm_q", [](const std::string& isa) { return kernels_named(isa).gemm_q != nullptr; });
  t.def("kernel_rmsnorm", [](const std::string& isa, Array<float> x, Array<float> w, float eps) {
    require(x.size() == w.size(), "x and w differ in size");
    Array<float> out(x.size());
    kernels_named(isa).rmsnorm(out.mutable_data(), x.data(), w.data(), int(x.size()), eps);
    return out;
  });
  t.def("kernel_rope", [](const std::string& isa, Array<float> v, Array<float> cos, Array<float> sin) {
    require(v.size() % 2 == 0 && cos.size() == v.size() / 2 && sin.size() == cos.size(), "rope sizes disagree");
    Array<float> out(v.size());
    std::memcpy(out.mutable_data(), v.data(), sizeof(float) * v.size());
    kernels_named(isa).rope(out.mutable_data(), cos.data(), sin.data(), int(v.size()));
    return out;
  });
  t.def(
      "kernel_attention",
      [](const std::string& isa, Array<float> q, Array<float> K, Array<float> V, float scale, int block_rows,
         const std::string& kv_dtype, int parts) {
        // q [d] or [heads, d] (a GQA group) against K, V [n, d]; or q [kv_heads, heads, d] against K, V
        // [kv_heads, n, d] (a layer's KV heads, in one call a part): attention_part over `parts` equal parts
        // of the keys (multiples of block_rows but the last), merged by attention_merge. Returns (out,
        // probs): out shaped as q; probs [.., n] normalised (parts == 1 only; else NaN).
        require(q.ndim() >= 1 && q.ndim() <= 3 && (q.ndim() == 3) == (K.ndim() == 3),
                "q must be [d] or [heads, d] for K [n, d], [kv_heads, heads, d] for K [kv_heads, n, d]");
        const int g = q.ndim() == 3 ? int(q.shape(0)) : 1, heads = q.ndim() == 1 ? 1 : int(q.shape(q.ndim() - 2)),
                  d = int(q.shape(q.ndim() - 1));
        require(K.ndim() >= 2 && V.ndim() == K.ndim() && K.shape(K.ndim() - 1) == d && parts >= 1,
                "attention shapes disagree");
        for (int i = 0; i < K.ndim(); ++i)
          require(K.shape(i) == V.shape(i) && K.shape(i) > 0, "attention shapes disagree");
        require(K.ndim() == 2 || K.shape(0) == g, "attention shapes disagree");
        const int n = int(K.shape(K.ndim() - 2));
        const PagedKv kv = paged_kv(K, V, block_rows, kv_dtype);
        const Kernels& k = kernels_named(isa);
        const long pf = attention_part_floats(heads, d), stride = long(parts) * pf;  // [g][parts][pf]
        const int per = (n + parts - 1) / parts;
        std::vector<float> partials(size_t(g) * stride), scratch(size_t(g) * heads * n);
        Array<float> out(std::vector<py::ssize_t>(q.shape(), q.shape() + q.ndim()));
        std::vector<py::ssize_t> probs_shape(q.shape(), q.shape() + q.ndim());
        probs_shape.back() = n;
        Array<float> probs(probs_shape);
        int used = 0;
        for (int p = 0; p * per < n; ++p, ++used) {
          float* part = partials.data() + p * pf;
          const int k0 = p * per, k1 = std::min(n, k0 + per);
          k.attention_part(q.data(), d, heads, g, kv.head, k0, k1, d, scale, parts == 1 ? scratch.data() : nullptr,
                           part, d, stride, part + long(heads) * d, part + long(heads) * d + heads);
          if (parts == 1)
            for (long h = 0; h < long(g) * heads; ++h)
              for (int j = 0; j < n; ++j)
                probs.mutable_data()[h * n + j] =
                    scratch[h * n + j] / part[(h / heads) * stride + long(heads) * d + heads + h % heads];
        }
        if (parts != 1) std::fill(probs.mutable_data(), probs.mutable_data() + probs.size(), std::nanf(""));
        for (int h = 0; h < g; ++h)
          attention_merge(partials.data() + h * stride, used, pf, heads, d, out.mutable_data() + long(h) * heads * d,
                          d);
        return py::make_tuple(out, probs);
      },
      py::arg("isa"), py::arg("q"), py::arg("K"), py::arg("V"), py::arg("scale"), py::arg("block_rows") = 16,
      py::arg("kv_dtype") = "f32", py::arg("parts") = 1);
  t.def(
      "kernel_attention_causal",
      [](const std::string& isa, Array<float> Q, Array<float> K, Array<float> V, int ctx0, float scale, bool bf16,
         int block_rows, const std::string& kv_dtype) {
        // Q [nq, d]: query i sees keys [0, ctx0 + i) of K, V [ctx0 + nq − 1, d]
        require(Q.ndim() == 2 && K.ndim() == 2 && V.ndim() == 2 && Q.shape(0) > 0 && ctx0 > 0, "bad shapes");
        const int nq = int(Q.shape(0)), d = int(Q.shape(1)), n = ctx0 + nq - 1;
        require(K.shape(0) == n && V.shape(0) == n && K.shape(1) == d && V.shape(1) == d, "attention shapes disagree");
        const PagedKv kv = paged_kv(K, V, block_rows, kv_dtype);
        Array<float> out({nq, d}), probs({nq, n});
        std::fill(probs.mutable_data(), probs.mutable_data() + probs.size(), -1.0f);  // untouched past each row's keys
        const Kernels& k = kernels_named(isa);
        if (bf16) {  // the avx512bf16 set's variant for bf16 and quantized models
          require(k.attention_causal_bf16 != nullptr, std::string(k.name) + " has no bf16 attention");
          require(d % 32 == 0, "the bf16 attention needs d a multiple of 32");
        }
        std::vector<float> scratch(bf16 ? attention_bf16_scratch_floats(n, d) : attention_scratch_floats(n, d));
        (bf16 ? k.attention_causal_bf16 : k.attention_causal)(Q.data(), d, nq, ctx0, kv.head, d, scale, scratch.data(),
                                                              out.mutable_data(), d, probs.mutable_data(), n);
        return py::make_tuple(out, probs);
      },
      py::arg("isa"), py::arg("Q"), py::arg("K"), py::arg("V"), py::arg("ctx0"), py::arg("scale"),
      py::arg("bf16") = false, py::arg("block_rows") = 16, py::arg("kv_dtype") = "f32");
  t.def(
      "kernel_convert_row",
      [](const std::string& isa, Array<float> x, const std::string& to) {
        // x in `to`: f32, uint16 bit patterns (bf16, f16), or the bytes of an int8 row (codes, bf16 scales)
        const DType t = parse_kv_dtype(to);
        py::array out = t == DType::F32  ? py::array(py::dtype::of<float>(), x.size())
                        : t == DType::Q8 ? py::array(py::dtype::of<uint8_t>(), kv_row_elements(t, x.size()))
                                         : py::array(py::dtype::of<uint16_t>(), x.size());
        kernels_named(isa).convert_row(x.data(), out.mutable_data(), t, int(x.size()));
        return out;
      },
      py::arg("isa"), py::arg("x"), py::arg("to"));
  t.def(
      "parallel_region",
      [](int threads, int n) {
        // The parallel.h interface at work: every thread of a region waits (up to 10 s) until all have
        // entered it, which only threads running at once can do; then a static loop and three dynamic
        // loops over n items (their counters reused) record which thread ran each item. Returns each
        // thread's (id, count), whether all met, the distinct OS threads, the static loop's thread per
        // item, and for each dynamic loop how many times each item ran.
        std::atomic<int> entered{0};
        std::vector<std::pair<int, int>> members(threads, {-1, -1});
        std::vector<std::thread::id> os(threads);
        std::vector<int> statics(n, -1);
        std::vector<std::vector<std::atomic<int>>> dynamics(3);
        for (auto& d : dynamics) d = std::vector<std::atomic<int>>(n);
        std::atomic<bool> met{true};
        {
          py::gil_scoped_release free;
          par::region(threads, [&] {
            const int id = par::thread_id();
            members[id] = {id, par::thread_count()}, os[id] = std::this_thread::get_id();
            entered.fetch_add(1);
            const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
            while (entered.load() < par::thread_count())
              if (std::chrono::steady_clock::now() > give_up) {
                met = false;
                break;
              }
            par::barrier();
            par::for_static(n, [&](int i) { statics[i] = par::thread_id(); });
            for (auto& d : dynamics) par::for_dynamic(n, [&](int i) { d[i].fetch_add(1); });
          });
        }
        std::sort(os.begin(), os.end());
        const int distinct = int(std::unique(os.begin(), os.end()) - os.begin());
        std::vector<std::vector<int>> hits;
        for (auto& d : dynamics) {
          hits.emplace_back();
          for (auto& h : d) hits.back().push_back(h.load());
        }
        return py::make_tuple(members, met.load(), distinct, statics, hits);
      },
      py::arg("threads"), py::arg("n"));
  t.def("kernel_silu_mul", [](const std::string& isa, Array<float> g, Array<float> u) {
    require(g.size() == u.size(), "g and u differ in size");
    Array<float> out(g.size());
    std::memcpy(out.mutable_data(), g.data(), sizeof(float) * g.size());
    kernels_named(isa).silu_mul(out.mutable_data(), u.data(), int(g.size()));
    return out;
  });
}
