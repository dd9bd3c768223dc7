// The kernels without Python: reads cases on stdin, runs each with the kernel set it names and
// writes its outputs on stdout, case by case, so that the kernel tests (tests/kernel_backends.py)
// can run a cross-compiled build under qemu-aarch64 exactly as they run the extension. Built by
// CMakeLists.txt with -DGALLY_KERNEL_RUNNER=ON and the same per-file flags as the extension.
//
// A case, little-endian: op and kernel set (each u32 length + bytes), u32 count + i64 integers,
// u32 count + f64 floats, u32 count + arrays (u64 bytes + bytes). Its output: an error message
// (u32 length + bytes, empty when it ran), u32 count + arrays. Ops, their integers → arrays:
//   info                                              → CPU flags "name=0|1,…", sets "a,b,…", selected set
//   select                                            → (error when the set is not available)
//   matmul [n_tok n_in n_out wtype r0 r1 acc bias]    x W scales mins b y codes → y
//                                                     (wtype: 0 f32 1 bf16 2 f16 3 int8 4 int4 v1 5 int4 v2)
//   matmul_many [n_tok n_in count (rows wtype r0 r1 acc)…]  x (W y)… → y…
//   quantize_rows [n n_in]                            x → xq xs xsum
//   matmul_quantized [n_tok n_in rows kind r0 r1 gemm acc]  xq xs xsum Wq Ws Wm y codes b → y
//                                                     (kind: 0 int8, 1 int4 v1, 2 int4 v2; gemm: through
//                                                     Kernels::gemm_q; b empty for none)
//   has_gemm_q                                        → "1" where the set has Kernels::gemm_q, else "0"
//   rmsnorm [n] (eps)                                 x w → out
//   rope [d]                                          v cos sin → v
//   attention [heads n d block_rows kv parts g] (scale) q K V → out probs (q [g, heads, d], K and V [g, n, d]:
//                                                      attention_part over `parts` equal parts of the keys for
//                                                      g KV heads at once, merged by attention_merge; probs
//                                                      [g, heads, n], NaN unless parts = 1)
//   attention_causal [nq ctx0 d block_rows kv] (scale) Q K V → out probs (−1 past each row's keys)
//   convert_row [n to]                                x → x in `to` (f32, 16-bit patterns, or int8 codes + bf16 scales)
// kv and to: 0 f32, 1 bf16, 2 f16, 3 int8. The attention ops copy K, V into a paged cache of blocks of
// block_rows positions in that type (kernels.h KvHead), laid out as kernels/paged_kv.h's PagedKv
// lays them: the blocks in reverse order in memory.
//   silu_mul [n]                                      g u → g
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "isa.h"
#include "kernels/kernels.h"
#include "kernels/paged_kv.h"

using namespace gally;

namespace {

using Bytes = std::vector<char>;

// Reads stdin; `more` is false at a clean end between cases.
struct Reader {
  bool more() {
    const int c = std::getc(stdin);
    if (c == EOF) return false;
    std::ungetc(c, stdin);
    return true;
  }
  Bytes bytes(size_t n) {
    Bytes out(n);
    if (n && std::fread(out.data(), 1, n, stdin) != n) throw std::runtime_error("truncated case");
    return out;
  }
  template <class T>
  T get() {
    const Bytes b = bytes(sizeof(T));
    T v;
    std::memcpy(&v, b.data(), sizeof(T));
    return v;
  }
  std::string str() {
    const Bytes s = bytes(get<uint32_t>());
    return std::string(s.begin(), s.end());
  }
};

struct Case {
  std::string op, isa;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  std::vector<Bytes> arrays;
};

template <class T>
std::vector<T> as(const Bytes& b) {
  std::vector<T> v(b.size() / sizeof(T));
  std::memcpy(v.data(), b.data(), v.size() * sizeof(T));
  return v;
}

template <class T>
Bytes bytes_of(const std::vector<T>& v) {
  Bytes b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

Bytes text(const std::string& s) { return Bytes(s.begin(), s.end()); }

// A set this CPU runs, or "generic-bf16", the scalar twin of the bf16 prompt sets.
const Kernels& set_named(const std::string& isa) {
  if (isa == "generic-bf16") return kernels_generic_bf16;
  const Kernels* k = kernels_for(isa);
  if (!k) throw std::invalid_argument("kernel set '" + isa + "' is not available on this CPU");
  return *k;
}

DType kv_type(int64_t code) {
  static const DType types[] = {DType::F32, DType::BF16, DType::F16, DType::Q8};
  if (code < 0 || code > 3) throw std::invalid_argument("bad cache type code");
  return types[code];
}

DType wtype(int64_t code) {
  static const DType types[] = {DType::F32, DType::BF16, DType::F16, DType::Q8, DType::Q4, DType::Q4K};
  if (code < 0 || code > 5) throw std::invalid_argument("bad weight type code");
  return types[code];
}

void need(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

std::vector<Bytes> run(const Case& c) {
  const auto& i = c.ints;
  const auto& a = c.arrays;
  if (c.op == "info") {
    std::string flags, sets;
    for (const auto& [name, on] : cpu_flags()) flags += (flags.empty() ? "" : ",") + name + "=" + (on ? "1" : "0");
    for (const auto& s : available_isas()) sets += (sets.empty() ? "" : ",") + s;
    return {text(flags), text(sets), text(selected_isa())};
  }
  if (c.op == "select") {
    select_isa(c.isa);
    return {};
  }
  const Kernels& k = set_named(c.isa);
  if (c.op == "matmul") {
    need(i.size() == 8 && a.size() == 7, "matmul: 8 integers, 7 arrays");
    const int n_tok = int(i[0]), n_in = int(i[1]), n_out = int(i[2]);
    const auto x = as<float>(a[0]), b = as<float>(a[4]);
    const auto s = as<uint16_t>(a[2]), m = as<uint16_t>(a[3]);
    const auto codes = as<uint8_t>(a[6]);
    auto y = as<float>(a[5]);
    need(x.size() == size_t(n_tok) * n_in && y.size() == size_t(n_tok) * n_out, "matmul: shapes disagree");
    const WeightsRef W{a[1].data(), wtype(i[3]), s.empty() ? nullptr : s.data(), m.empty() ? nullptr : m.data(),
                       codes.empty() ? nullptr : codes.data()};
    k.matmul(x.data(), W, i[7] ? b.data() : nullptr, y.data(), n_tok, n_in, n_out, int(i[4]), int(i[5]), i[6] != 0);
    return {bytes_of(y)};
  }
  if (c.op == "matmul_many") {
    const int n_tok = int(i[0]), n_in = int(i[1]), count = int(i[2]);
    need(i.size() == 3 + 5 * size_t(count) && a.size() == 1 + 2 * size_t(count), "matmul_many: counts disagree");
    const auto x = as<float>(a[0]);
    std::vector<std::vector<float>> ys;
    std::vector<MatmulOut> outs;
    for (int j = 0; j < count; ++j) ys.push_back(as<float>(a[2 + 2 * j]));
    for (int j = 0; j < count; ++j) {
      const int64_t* job = &i[3 + 5 * j];
      outs.push_back({WeightsRef{a[1 + 2 * j].data(), wtype(job[1])}, nullptr, ys[j].data(), int(job[0]), int(job[2]),
                      int(job[3]), job[4] != 0});
    }
    k.matmul_many(x.data(), n_tok, n_in, outs.data(), count);
    std::vector<Bytes> out;
    for (const auto& y : ys) out.push_back(bytes_of(y));
    return out;
  }
  if (c.op == "quantize_rows") {
    const int n = int(i[0]), n_in = int(i[1]);
    const auto x = as<float>(a[0]);
    need(x.size() == size_t(n) * n_in && n_in % QGROUP == 0, "quantize_rows: shapes disagree");
    std::vector<int16_t> q(x.size());
    std::vector<float> s(x.size() / QGROUP), sum(x.size() / QGROUP);
    k.quantize_rows(x.data(), n, n_in, q.data(), s.data(), sum.data());
    return {bytes_of(q), bytes_of(s), bytes_of(sum)};
  }
  if (c.op == "matmul_quantized") {
    need(i.size() == 8 && a.size() == 9, "matmul_quantized: 8 integers, 9 arrays");
    const int n_tok = int(i[0]), n_in = int(i[1]), rows = int(i[2]);
    const auto xq = as<int16_t>(a[0]);
    const auto xs = as<float>(a[1]), xsum = as<float>(a[2]);
    const auto Ws = as<uint16_t>(a[4]), Wm = as<uint16_t>(a[5]);
    const auto codes = as<uint8_t>(a[7]);
    auto y = as<float>(a[6]);
    const auto b = as<float>(a[8]);
    need(xq.size() == size_t(n_tok) * n_in && y.size() == size_t(n_tok) * rows, "matmul_quantized: shapes disagree");
    need(b.empty() || b.size() == size_t(rows), "matmul_quantized: the bias must have one value a row");
    const float* bp = b.empty() ? nullptr : b.data();
    const bool acc = i[7] != 0;
    const WeightsRef W{a[3].data(),
                       i[3] == 2 ? DType::Q4K
                       : i[3]    ? DType::Q4
                                 : DType::Q8,
                       Ws.data(), i[3] ? Wm.data() : nullptr, i[3] == 2 ? codes.data() : nullptr};
    if (i[6]) {
      need(k.gemm_q != nullptr, (std::string(k.name) + " has no gemm_q").c_str());
      k.gemm_q(xq.data(), xs.data(), xsum.data(), W, bp, y.data(), n_tok, n_in, rows, int(i[4]), int(i[5]), acc);
    } else if (i[3] == 2) {
      k.matmul_q4k(xq.data(), xs.data(), xsum.data(), W, bp, y.data(), n_tok, n_in, rows, int(i[4]), int(i[5]), acc);
    } else if (i[3]) {
      k.matmul_q4(xq.data(), xs.data(), xsum.data(), (const uint8_t*)a[3].data(), Ws.data(), Wm.data(), bp, y.data(),
                  n_tok, n_in, rows, int(i[4]), int(i[5]), acc);
    } else {
      k.matmul_q8(xq.data(), xs.data(), (const int8_t*)a[3].data(), Ws.data(), bp, y.data(), n_tok, n_in, rows,
                  int(i[4]), int(i[5]), acc);
    }
    return {bytes_of(y)};
  }
  if (c.op == "has_gemm_q") return {text(k.gemm_q ? "1" : "0")};
  if (c.op == "rmsnorm") {
    const auto x = as<float>(a[0]), w = as<float>(a[1]);
    std::vector<float> out(x.size());
    k.rmsnorm(out.data(), x.data(), w.data(), int(i[0]), float(c.floats[0]));
    return {bytes_of(out)};
  }
  if (c.op == "rope") {
    auto v = as<float>(a[0]);
    const auto cs = as<float>(a[1]), sn = as<float>(a[2]);
    k.rope(v.data(), cs.data(), sn.data(), int(i[0]));
    return {bytes_of(v)};
  }
  if (c.op == "attention") {
    const int heads = int(i[0]), n = int(i[1]), d = int(i[2]), parts = int(i[5]), g = int(i[6]);
    const auto q = as<float>(a[0]), K = as<float>(a[1]), V = as<float>(a[2]);
    need(q.size() == size_t(g) * heads * d && K.size() == size_t(g) * n * d && V.size() == K.size() && n > 0 &&
             parts >= 1 && g >= 1,
         "attention: shapes disagree");
    const PagedKv kv(K.data(), V.data(), g, n, d, int(i[3]), kv_type(i[4]));
    const long pf = attention_part_floats(heads, d), stride = long(parts) * pf;  // partials [g][parts][pf]
    const int per = (n + parts - 1) / parts;
    std::vector<float> partials(size_t(g) * stride), scratch(size_t(g) * heads * n), out(size_t(g) * heads * d),
        probs(size_t(g) * heads * n, std::nanf(""));
    int used = 0;
    for (int p = 0; p * per < n; ++p, ++used) {
      float* part = partials.data() + p * pf;
      const int k0 = p * per, k1 = std::min(n, k0 + per);
      k.attention_part(q.data(), d, heads, g, kv.head, k0, k1, d, float(c.floats[0]),
                       parts == 1 ? scratch.data() : nullptr, part, d, stride, part + long(heads) * d,
                       part + long(heads) * d + heads);
      if (parts == 1)
        for (long h = 0; h < long(g) * heads; ++h)
          for (int j = 0; j < n; ++j)
            probs[h * n + j] = scratch[h * n + j] / part[(h / heads) * stride + long(heads) * d + heads + h % heads];
    }
    for (int h = 0; h < g; ++h)
      attention_merge(partials.data() + h * stride, used, pf, heads, d, out.data() + long(h) * heads * d, d);
    return {bytes_of(out), bytes_of(probs)};
  }
  if (c.op == "attention_causal") {
    const int nq = int(i[0]), ctx0 = int(i[1]), d = int(i[2]), n = ctx0 + nq - 1;
    const auto Q = as<float>(a[0]), K = as<float>(a[1]), V = as<float>(a[2]);
    need(Q.size() == size_t(nq) * d && K.size() == size_t(n) * d && V.size() == K.size(), "attention: shapes disagree");
    const PagedKv kv(K.data(), V.data(), 1, n, d, int(i[3]), kv_type(i[4]));
    std::vector<float> out(size_t(nq) * d), probs(size_t(nq) * n, -1.0f), scratch(attention_scratch_floats(n, d));
    k.attention_causal(Q.data(), d, nq, ctx0, kv.head, d, float(c.floats[0]), scratch.data(), out.data(), d,
                       probs.data(), n);
    return {bytes_of(out), bytes_of(probs)};
  }
  if (c.op == "convert_row") {
    const auto x = as<float>(a[0]);
    const DType t = kv_type(i[1]);
    need(x.size() == size_t(i[0]), "convert_row: shapes disagree");
    Bytes out(kv_row_elements(t, long(x.size())) * kv_element_size(t));
    k.convert_row(x.data(), out.data(), t, int(x.size()));
    return {out};
  }
  if (c.op == "silu_mul") {
    auto g = as<float>(a[0]);
    const auto u = as<float>(a[1]);
    k.silu_mul(g.data(), u.data(), int(i[0]));
    return {bytes_of(g)};
  }
  throw std::invalid_argument("unknown op '" + c.op + "'");
}

template <class T>
void put(T v) {
  std::fwrite(&v, sizeof(T), 1, stdout);
}

}  // namespace

int main() {
  try {
    Reader r;
    while (r.more()) {
      Case c;
      c.op = r.str();
      c.isa = r.str();
      for (uint32_t n = r.get<uint32_t>(); n > 0; --n) c.ints.push_back(r.get<int64_t>());
      for (uint32_t n = r.get<uint32_t>(); n > 0; --n) c.floats.push_back(r.get<double>());
      for (uint32_t n = r.get<uint32_t>(); n > 0; --n) c.arrays.push_back(r.bytes(r.get<uint64_t>()));
      std::vector<Bytes> results;
      std::string error;
      try {
        results = run(c);
      } catch (const std::exception& e) {
        error = e.what();
      }
      put<uint32_t>(uint32_t(error.size()));
      std::fwrite(error.data(), 1, error.size(), stdout);
      put<uint32_t>(uint32_t(results.size()));
      for (const Bytes& b : results) {
        put<uint64_t>(b.size());
        std::fwrite(b.data(), 1, b.size(), stdout);
      }
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kernel_runner: %s\n", e.what());
    return 1;
  }
  return 0;
}
