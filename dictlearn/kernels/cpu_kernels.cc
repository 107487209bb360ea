// CPU kernels for the TopK family's training step, called from JAX through XLA's FFI
// (see dictlearn/kernels/cpu.py, which builds this file on first use).
//
//   DictlearnMatmulNT  out = a @ w.T in float32 through OpenBLAS (scipy-openblas32). XLA's own CPU GEMM
//                      reaches about 70-80% of OpenBLAS's rate on an SAE encoder's shapes, and this is
//                      the one dense matmul of a TopK step.
//   DictlearnTopK      exact top-k of each row of x + bias, sorted by decreasing value (ties: lower index
//                      first, as lax.top_k), rows split across threads. One streaming pass that skips
//                      16-wide blocks whose maximum cannot enter the row's current top k.
//   DictlearnScatterRows  out[i] = sum of w[b, j] * rows[b] over the (b, j) with idx[b, j] == i: the TopK
//                      step's encoder and decoder gradients. The entries are bucketed by latent first
//                      (a counting sort), so each output row is built in cache and written once, instead
//                      of a read-modify-write of a whole row per entry; entries of weight zero (BatchTopK's
//                      unselected candidate slots) are left out.
//   DictlearnScatterRowsAt  the same with rows[sel[b, j]] in place of rows[b]: Matryoshka's grouped decode
//                      (forward: out row b * G + group, reading decoder rows) and its decoder gradient
//                      (reading each slot's own prefix group's output gradient).
//   DictlearnGatherDots out[b, j] = <rows[b], table[idx[b, j]]>: the decoder's backward to the code values.
//                      Bucketed the same way, so each table row is read once.
//   DictlearnGatherDotsAt  the same with rows[sel[b, j]], and 0 where sel[b, j] is -1: Matryoshka's
//                      backward to the code values, computed only at the selected slots.
//   DictlearnRowDots   out[i] = <a[i], b[i]> for (n, d) arrays: the decoder's row norms and the gradient's
//                      parallel parts. As a custom call it keeps XLA's CPU reduction fusion from pulling
//                      the Adam update into the reduction, where it materialises every scalar constant
//                      as a full (n, d) array.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error MatmulNT(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  auto ad = a.dimensions();
  auto wd = w.dimensions();
  if (ad.size() != 2 || wd.size() != 2 || ad[1] != wd[1]) {
    return ffi::Error::InvalidArgument("cpu_kernels matmul_nt: expected a (M, K) and w (N, K)");
  }
  const int64_t m = ad[0], k = ad[1], n = wd[0];
  if (m > INT_MAX || n > INT_MAX || k > INT_MAX) {
    return ffi::Error::InvalidArgument("cpu_kernels matmul_nt: a dimension exceeds the 32-bit BLAS interface");
  }
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(out->typed_data(), out->typed_data() + m * n, 0.0f);
    return ffi::Error::Success();
  }
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n),
                    static_cast<int>(k), 1.0f, a.typed_data(), static_cast<int>(k), w.typed_data(),
                    static_cast<int>(k), 0.0f, out->typed_data(), static_cast<int>(n));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnMatmulNT, MatmulNT,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

namespace {

struct Slot {
  float v;
  int32_t i;
};

// a ranks below b: smaller value, or the same value at a larger index.
inline bool Worse(const Slot& a, const Slot& b) { return a.v < b.v || (a.v == b.v && a.i > b.i); }
// Heap order for std heap functions: the root is the worst kept slot.
inline bool HeapLess(const Slot& a, const Slot& b) { return Worse(b, a); }

constexpr int64_t kBlock = 16;

inline float Dot(const float* x, const float* y, int64_t d) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < d; ++j) acc += x[j] * y[j];
  return acc;
}

// work(lo, hi) over [0, rows) split into `threads` contiguous ranges (at least 1), the caller's thread
// taking the first.
template <typename F>
void ParallelRows(int64_t rows, int64_t threads, F work) {
  const int64_t t = std::max<int64_t>(1, threads);
  const int64_t per = (rows + t - 1) / t;
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < t; ++w) pool.emplace_back(work, std::min(rows, w * per), std::min(rows, (w + 1) * per));
  work(0, std::min(rows, per));
  for (auto& th : pool) th.join();
}

void TopKRow(const float* x, const float* bias, int64_t n, int64_t k, float* vals, int32_t* idx, Slot* heap) {
  for (int64_t j = 0; j < k; ++j) heap[j] = Slot{x[j] + bias[j], static_cast<int32_t>(j)};
  std::make_heap(heap, heap + k, HeapLess);
  auto offer = [&](int64_t j) {
    const Slot s{x[j] + bias[j], static_cast<int32_t>(j)};
    if (Worse(heap[0], s)) {  // replace the worst kept slot and sift it down (one pass, not pop + push)
      int64_t p = 0;
      for (;;) {
        int64_t c = 2 * p + 1;
        if (c >= k) break;
        if (c + 1 < k && Worse(heap[c + 1], heap[c])) ++c;
        if (!Worse(heap[c], s)) break;
        heap[p] = heap[c];
        p = c;
      }
      heap[p] = s;
    }
  };
  int64_t j = k;
  for (; j < n && j % kBlock; ++j) offer(j);
  for (; j + kBlock <= n; j += kBlock) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t t = 0; t < kBlock; ++t) m = std::max(m, x[j + t] + bias[j + t]);
    if (m >= heap[0].v) {  // >=: an equal value at a larger index never enters, but it is cheap to check
      for (int64_t t = 0; t < kBlock; ++t) offer(j + t);
    }
  }
  for (; j < n; ++j) offer(j);
  std::sort(heap, heap + k, [](const Slot& a, const Slot& b) { return Worse(b, a); });
  for (int64_t t = 0; t < k; ++t) {
    vals[t] = heap[t].v;
    idx[t] = heap[t].i;
  }
}

}  // namespace

static ffi::Error TopK(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> bias, int64_t k, int64_t threads,
                       ffi::ResultBuffer<ffi::F32> vals, ffi::ResultBuffer<ffi::S32> idx) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || bias.dimensions().size() != 1 || bias.dimensions()[0] != xd[1]) {
    return ffi::Error::InvalidArgument("cpu_kernels top_k: expected x (B, n) and bias (n,)");
  }
  const int64_t rows = xd[0], n = xd[1];
  if (k < 1 || k > n || n > INT32_MAX) return ffi::Error::InvalidArgument("cpu_kernels top_k: need 0 < k <= n < 2**31");
  const float* xp = x.typed_data();
  const float* bp = bias.typed_data();
  float* vp = vals->typed_data();
  int32_t* ip = idx->typed_data();
  ParallelRows(rows, std::min<int64_t>(threads, rows / 16), [&](int64_t lo, int64_t hi) {
    std::vector<Slot> heap(k);
    for (int64_t r = lo; r < hi; ++r) TopKRow(xp + r * n, bp, n, k, vp + r * k, ip + r * k, heap.data());
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnTopK, TopK,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

static ffi::Error RowDots(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, int64_t threads,
                          ffi::ResultBuffer<ffi::F32> out) {
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || ad[0] != bd[0] || ad[1] != bd[1]) {
    return ffi::Error::InvalidArgument("cpu_kernels row_dots: expected two (n, d) arrays of one shape");
  }
  const int64_t rows = ad[0], d = ad[1];
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  float* op = out->typed_data();
  ParallelRows(rows, std::min<int64_t>(threads, rows * d / (1 << 18)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      op[r] = Dot(ap + r * d, bp + r * d, d);
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnRowDots, RowDots,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The signatures of the bucketed kernels: (f32 (B, k) or (B, d), s32 indices, f32 table or rows, threads)
// -> f32, and the same with an s32 row selector after the rows.
static auto BindIndexed() {
  return ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("threads").Ret<ffi::Buffer<ffi::F32>>();
}
static auto BindIndexedAt() {
  return ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>().Attr<int64_t>("threads").Ret<ffi::Buffer<ffi::F32>>();
}

// Counting sort of the entries e in 0..m-1 with keep(e) by idx[e]: the entries of index i are
// order[start[i] .. start[i + 1]). False if an index lies outside [0, n).
template <typename Keep>
static bool BucketByIndex(const int32_t* idx, int64_t m, int64_t n, Keep keep, std::vector<int64_t>& start,
                          std::vector<int64_t>& order) {
  start.assign(n + 1, 0);
  for (int64_t e = 0; e < m; ++e) {
    if (idx[e] < 0 || idx[e] >= n) return false;
    if (keep(e)) ++start[idx[e] + 1];
  }
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
  order.resize(start[n]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t e = 0; e < m; ++e) {
    if (keep(e)) order[fill[idx[e]]++] = e;
  }
  return true;
}

// Which row of the (R, d) row array entry e (of the (B, k) index array) reads: its token's row e / k,
// or the row a (B, k) selector names.
struct TokenRow {
  int64_t k;
  int64_t operator()(int64_t e) const { return e / k; }
};
struct SelectedRow {
  const int32_t* sel;
  int64_t operator()(int64_t e) const { return sel[e]; }
};

// Every v[e] in [lo, n)?
static bool InRange(const int32_t* v, int64_t m, int64_t lo, int64_t n) {
  for (int64_t e = 0; e < m; ++e) {
    if (v[e] < lo || v[e] >= n) return false;
  }
  return true;
}

// out[i] = sum over the entries e with idx[e] == i and w[e] != 0 of w[e] * rows[row_of(e)]; out is (n, d).
template <typename RowOf>
static ffi::Error ScatterRowsImpl(const float* wp, const int32_t* ip, int64_t m, const float* rp, int64_t d, RowOf row_of,
                                  int64_t threads, float* op, int64_t n, const char* name) {
  std::vector<int64_t> start, order;
  if (!BucketByIndex(ip, m, n, [wp](int64_t e) { return wp[e] != 0.0f; }, start, order)) {
    return ffi::Error::InvalidArgument(std::string("cpu_kernels ") + name + ": an index is outside [0, n)");
  }
  ParallelRows(n, std::min<int64_t>(threads, n * d / (1 << 16)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      float* o = op + i * d;
      std::fill(o, o + d, 0.0f);
      for (int64_t s = start[i]; s < start[i + 1]; ++s) {
        const int64_t e = order[s];
        const float w = wp[e];
        const float* r = rp + row_of(e) * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) o[j] += w * r[j];
      }
    }
  });
  return ffi::Error::Success();
}

// out[e] = <rows[row_of(e)], table[idx[e]]> for every entry e (0 where row_of(e) < 0).
template <typename RowOf>
static ffi::Error GatherDotsImpl(const float* rp, const int32_t* ip, int64_t m, const float* tp, int64_t n, int64_t d,
                                 RowOf row_of, int64_t threads, float* op, const char* name) {
  std::vector<int64_t> start, order;
  if (!BucketByIndex(ip, m, n, [&](int64_t e) { return row_of(e) >= 0; }, start, order)) {
    return ffi::Error::InvalidArgument(std::string("cpu_kernels ") + name + ": an index is outside [0, n)");
  }
  if (start[n] < m) std::fill(op, op + m, 0.0f);  // some entries have no row
  ParallelRows(n, std::min<int64_t>(threads, n * d / (1 << 16)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float* t = tp + i * d;
      for (int64_t s = start[i]; s < start[i + 1]; ++s) {
        const int64_t e = order[s];
        op[e] = Dot(rp + row_of(e) * d, t, d);
      }
    }
  });
  return ffi::Error::Success();
}

static ffi::Error ScatterRows(ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::F32> rows,
                              int64_t threads, ffi::ResultBuffer<ffi::F32> out) {
  auto wd = weights.dimensions();
  auto id = indices.dimensions();
  auto rd = rows.dimensions();
  auto od = out->dimensions();
  if (wd.size() != 2 || id.size() != 2 || rd.size() != 2 || od.size() != 2 || wd[0] != id[0] || wd[1] != id[1] ||
      rd[0] != wd[0] || rd[1] != od[1]) {
    return ffi::Error::InvalidArgument("cpu_kernels scatter_rows: expected weights and indices (B, k), rows (B, d), out (n, d)");
  }
  return ScatterRowsImpl(weights.typed_data(), indices.typed_data(), wd[0] * wd[1], rows.typed_data(), rd[1],
                         TokenRow{wd[1]}, threads, out->typed_data(), od[0], "scatter_rows");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnScatterRows, ScatterRows,
                              BindIndexed());

static ffi::Error ScatterRowsAt(ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::F32> rows,
                                ffi::Buffer<ffi::S32> row_of, int64_t threads, ffi::ResultBuffer<ffi::F32> out) {
  auto wd = weights.dimensions();
  auto id = indices.dimensions();
  auto sd = row_of.dimensions();
  auto rd = rows.dimensions();
  auto od = out->dimensions();
  if (wd.size() != 2 || id.size() != 2 || sd.size() != 2 || rd.size() != 2 || od.size() != 2 || wd[0] != id[0] ||
      wd[1] != id[1] || sd[0] != wd[0] || sd[1] != wd[1] || rd[1] != od[1]) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels scatter_rows_at: expected weights, indices and row selector (B, k), rows (R, d), out (n, d)");
  }
  const int64_t m = wd[0] * wd[1];
  if (!InRange(row_of.typed_data(), m, 0, rd[0])) {
    return ffi::Error::InvalidArgument("cpu_kernels scatter_rows_at: a row selector is outside [0, R)");
  }
  return ScatterRowsImpl(weights.typed_data(), indices.typed_data(), m, rows.typed_data(), rd[1],
                         SelectedRow{row_of.typed_data()}, threads, out->typed_data(), od[0], "scatter_rows_at");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnScatterRowsAt, ScatterRowsAt,
                              BindIndexedAt());

static ffi::Error GatherDots(ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::F32> table,
                             int64_t threads, ffi::ResultBuffer<ffi::F32> out) {
  auto rd = rows.dimensions();
  auto id = indices.dimensions();
  auto td = table.dimensions();
  if (rd.size() != 2 || id.size() != 2 || td.size() != 2 || id[0] != rd[0] || td[1] != rd[1]) {
    return ffi::Error::InvalidArgument("cpu_kernels gather_dots: expected rows (B, d), indices (B, k), table (n, d)");
  }
  return GatherDotsImpl(rows.typed_data(), indices.typed_data(), id[0] * id[1], table.typed_data(), td[0], td[1],
                        TokenRow{id[1]}, threads, out->typed_data(), "gather_dots");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnGatherDots, GatherDots,
                              BindIndexed());

static ffi::Error GatherDotsAt(ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::F32> table,
                               ffi::Buffer<ffi::S32> row_of, int64_t threads, ffi::ResultBuffer<ffi::F32> out) {
  auto rd = rows.dimensions();
  auto id = indices.dimensions();
  auto sd = row_of.dimensions();
  auto td = table.dimensions();
  if (rd.size() != 2 || id.size() != 2 || sd.size() != 2 || td.size() != 2 || sd[0] != id[0] || sd[1] != id[1] ||
      td[1] != rd[1]) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels gather_dots_at: expected rows (R, d), indices and row selector (B, k), table (n, d)");
  }
  const int64_t m = id[0] * id[1];
  if (!InRange(row_of.typed_data(), m, -1, rd[0])) {
    return ffi::Error::InvalidArgument("cpu_kernels gather_dots_at: a row selector is outside [-1, R)");
  }
  return GatherDotsImpl(rows.typed_data(), indices.typed_data(), m, table.typed_data(), td[0], td[1],
                        SelectedRow{row_of.typed_data()}, threads, out->typed_data(), "gather_dots_at");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnGatherDotsAt, GatherDotsAt,
                              BindIndexedAt());
