// CPU kernels for the TopK family's training step, called from JAX through XLA's FFI
// (see dictlearn/kernels/cpu.py, which builds this file on first use).
//
//   DictlearnMatmulNT  out = a @ w.T in float32 through OpenBLAS (scipy-openblas32). XLA's own CPU GEMM
//                      reaches about 70-80% of OpenBLAS's rate on an SAE encoder's shapes, and this is
//                      the one dense matmul of a TopK step.
//   DictlearnTopK      exact top-k of each row of x + bias, sorted by decreasing value (ties: lower index
//                      first, as lax.top_k), rows split across threads. One streaming pass that skips
//                      16-wide blocks whose maximum cannot enter the row's current top k.
//   DictlearnRowDots   out[i] = <a[i], b[i]> for (n, d) arrays: the decoder's row norms and the gradient's
//                      parallel parts. As a custom call it keeps XLA's CPU reduction fusion from pulling
//                      the Adam update into the reduction, where it materialises every scalar constant
//                      as a full (n, d) array.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <thread>
#include <utility>
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

void TopKRow(const float* x, const float* bias, int64_t n, int64_t k, float* vals, int32_t* idx, Slot* heap) {
  for (int64_t j = 0; j < k; ++j) heap[j] = Slot{x[j] + bias[j], static_cast<int32_t>(j)};
  std::make_heap(heap, heap + k, HeapLess);
  auto offer = [&](int64_t j) {
    const Slot s{x[j] + bias[j], static_cast<int32_t>(j)};
    if (Worse(heap[0], s)) {
      std::pop_heap(heap, heap + k, HeapLess);
      heap[k - 1] = s;
      std::push_heap(heap, heap + k, HeapLess);
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
  auto work = [&](int64_t lo, int64_t hi) {
    std::vector<Slot> heap(k);
    for (int64_t r = lo; r < hi; ++r) TopKRow(xp + r * n, bp, n, k, vp + r * k, ip + r * k, heap.data());
  };
  int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, rows / 16));
  if (t == 1) {
    work(0, rows);
    return ffi::Error::Success();
  }
  std::vector<std::thread> pool;
  const int64_t per = (rows + t - 1) / t;
  for (int64_t w = 1; w < t; ++w) pool.emplace_back(work, std::min(rows, w * per), std::min(rows, (w + 1) * per));
  work(0, std::min(rows, per));
  for (auto& th : pool) th.join();
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
  auto work = [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* x = ap + r * d;
      const float* y = bp + r * d;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < d; ++j) acc += x[j] * y[j];
      op[r] = acc;
    }
  };
  int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, rows * d / (1 << 18)));
  std::vector<std::thread> pool;
  const int64_t per = (rows + t - 1) / t;
  for (int64_t w = 1; w < t; ++w) pool.emplace_back(work, std::min(rows, w * per), std::min(rows, (w + 1) * per));
  work(0, std::min(rows, per));
  for (auto& th : pool) th.join();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnRowDots, RowDots,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());
