// Few-row matmul against one layer of a stacked weight, read in place: y[M, N] = x[M, K] . w[layer][K, N] (* scale
// [layer][N]), x float32, w float32, bfloat16 or int8 (then with one scale per output column, float32 or bfloat16),
// float32 accumulation, y float32. Compiled with matmul.cc by qcjax/cpu/build.py; called through jax.ffi by
// qcjax/cpu/layers.py, the CPU's layer loop for decode steps.
//
// Why: the model scans its layers over ONE stacked copy of the weights ([layers, in, out]); inside the scan XLA:CPU
// copies each layer's weights out of the stack (a dynamic-slice) before its dot, so a decode step read every weight
// three times (read, write, read) instead of once. Taking the stack and the layer index, the kernel reads the layer's
// weights where they are, once.
//
// The weights are [in, out] (the model's layout): each weight row k is multiplied by x[:, k] and added into the
// output columns. The work is split into units of (column block, row chunk): column blocks of up to 256 outputs
// (every weight row segment at least 256 bytes, a few whole cache lines), row chunks only where there are too few
// column blocks to share out; the row chunks' partial sums go to a scratch array and are summed in chunk order (so
// the result does not depend on the thread count or the schedule). Inside a unit, 4 weight rows at a time are
// widened to float32 and folded into the unit's outputs, which stay in L1.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

#ifdef __AVX512F__
constexpr int L = 16;
#else
constexpr int L = 8;
#endif
typedef float f32v __attribute__((vector_size(4 * L)));
typedef uint16_t u16v __attribute__((vector_size(2 * L)));
typedef uint32_t u32v __attribute__((vector_size(4 * L)));
typedef int8_t i8v __attribute__((vector_size(L)));

#ifndef PREFETCH
#define PREFETCH 1024
#endif
constexpr int64_t NB = 256;  // outputs per column block (the unit's outputs: 8 rows x 256 x 4 B = 8 KiB of L1)

inline f32v widen(const float* p) {
  f32v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline f32v widen(const uint16_t* p) {  // bfloat16 -> float32: the bits shifted into the high half
  u16v h;
  std::memcpy(&h, p, sizeof(h));
  u32v w = __builtin_convertvector(h, u32v) << 16;
  f32v v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

inline f32v widen(const int8_t* p) {  // int8 -> float32 (exact)
  i8v h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, f32v);
}

inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) {
  uint32_t b = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}
inline float scalar(int8_t v) { return float(v); }

// Unit: x rows [0, R) (row stride k) against weight rows [k0, k1) and columns [n0, n0 + nb) of w ([k, n]); the sums
// go to out[r * out_stride + j], j in [0, nb) (the caller offsets out to column n0 or its scratch).
template <int R, typename T>
void unit(const float* x, int64_t k, const T* w, int64_t n, int64_t k0, int64_t k1, int64_t n0, int64_t nb,
          float* out, int64_t out_stride, float* scratch) {
  float* acc[R];  // the unit's sums: R rows of nb in the thread's scratch (at most 32 KiB: L1)
  for (int r = 0; r < R; ++r) {
    acc[r] = scratch + r * nb;
    std::memset(acc[r], 0, sizeof(float) * nb);
  }
  const int64_t nv = nb / L * L;
  // Prefetch, one line per line read, inside the loop (a burst of a whole row's lines stalled it): whole rows are
  // one contiguous stream, prefetched PREFETCH bytes ahead in each of the 4 rows; a column block's segments are
  // `ahead` rows down (~2 KiB of its segments ahead).
  const bool whole = nb == n;
  const int64_t row_bytes = nb * int64_t(sizeof(T));
  const int64_t ahead = std::max<int64_t>(4, std::min<int64_t>(32, (2048 / row_bytes + 3) / 4 * 4));
  const int64_t pf = whole ? int64_t(PREFETCH / sizeof(T)) : ahead * n;
  constexpr int64_t line = 64 / sizeof(T) < L ? L : 64 / sizeof(T);  // elements per prefetched line (or vector)
  int64_t kk = k0;
  for (; kk + 4 <= k1; kk += 4) {
    const T* w0 = w + kk * n + n0;
    f32v xs[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) {
        f32v v = {};
        v += x[r * k + kk + i];
        xs[r][i] = v;
      }
    int64_t j = 0;
    for (; j < nv; j += L) {
      if (j % line == 0)
        for (int i = 0; i < 4; ++i) __builtin_prefetch(w0 + i * n + j + pf);
      const f32v a = widen(w0 + j), b = widen(w0 + n + j), c = widen(w0 + 2 * n + j), d = widen(w0 + 3 * n + j);
      for (int r = 0; r < R; ++r) {
        f32v s = widen(&acc[r][j]);
        s += xs[r][0] * a;
        s += xs[r][1] * b;
        s += xs[r][2] * c;
        s += xs[r][3] * d;
        std::memcpy(&acc[r][j], &s, sizeof(s));
      }
    }
    for (; j < nb; ++j)
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < 4; ++i) acc[r][j] += x[r * k + kk + i] * scalar(w0[i * n + j]);
  }
  for (; kk < k1; ++kk) {
    const T* w0 = w + kk * n + n0;
    int64_t j = 0;
    for (; j < nv; j += L) {
      const f32v a = widen(w0 + j);
      for (int r = 0; r < R; ++r) {
        f32v s = widen(&acc[r][j]);
        s += x[r * k + kk] * a;
        std::memcpy(&acc[r][j], &s, sizeof(s));
      }
    }
    for (; j < nb; ++j)
      for (int r = 0; r < R; ++r) acc[r][j] += x[r * k + kk] * scalar(w0[j]);
  }
  for (int r = 0; r < R; ++r) std::memcpy(out + r * out_stride, acc[r], sizeof(float) * nb);
  (void)NB;
}

template <typename T>
void unit_rows(const float* x, int64_t m, int64_t k, const T* w, int64_t n, int64_t k0, int64_t k1, int64_t n0,
               int64_t nb, float* out, int64_t out_stride, float* scratch) {
  for (int64_t m0 = 0; m0 < m; m0 += 8) {  // blocks of 8 x rows (a decode batch is at most 8: one block)
    const float* xb = x + m0 * k;
    float* ob = out + m0 * out_stride;
    switch (std::min<int64_t>(8, m - m0)) {
      case 1: unit<1>(xb, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
      case 2: unit<2>(xb, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
      case 3: unit<3>(xb, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
      case 4: unit<4>(xb, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
      case 5: unit<5>(xb, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
      case 6: unit<6>(xb, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
      case 7: unit<7>(xb, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
      default: unit<8>(xb, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
    }
  }
}

template <typename S>
void apply_scale(float* y, int64_t m, int64_t n, int64_t n0, int64_t nb, const S* scale) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < nb; ++j) y[r * n + n0 + j] *= scalar(scale[n0 + j]);
}

constexpr int64_t UNITS = 16;  // units to aim for: enough to share over the threads when one wakes late
constexpr int64_t SCRATCH = 8192;  // floats of sums a unit keeps (32 KiB: L1)

// How the work is cut (the shapes alone decide, not the thread count, so the order of the sums is fixed):
// while a unit can keep the sums of whole output rows (n x min(m, 8) <= SCRATCH floats), units are chunks of whole
// weight rows (contiguous memory, the stream the hardware prefetcher follows) whose partial sums are added in chunk
// order; wider outputs are cut into column blocks (row segments of >= 256 outputs).
struct Plan {
  int64_t nb, blocks, chunks, rows_per;
};

Plan plan(int64_t m, int64_t k, int64_t n) {
  Plan p;
  const int64_t cap = SCRATCH / std::min<int64_t>(8, m);
  if (n <= cap) {
    p.nb = n;
    p.blocks = 1;
    p.chunks = std::max<int64_t>(1, std::min<int64_t>(UNITS, k / 64));
  } else {
    p.nb = std::min(cap, std::max(NB, (n + UNITS - 1) / UNITS / L * L + L));
    p.blocks = (n + p.nb - 1) / p.nb;
    p.chunks = p.blocks >= UNITS / 2 ? 1 : std::max<int64_t>(1, std::min<int64_t>((UNITS + p.blocks - 1) / p.blocks, k / 128));
  }
  p.rows_per = (k + p.chunks - 1) / p.chunks;
  p.chunks = (k + p.rows_per - 1) / p.rows_per;
  return p;
}

template <typename T, typename S>
ffi::Error run(ffi::ThreadPool pool, const float* x, const T* w, const S* scale, float* y, int64_t m, int64_t k,
               int64_t n) {
  const Plan p = plan(m, k, n);
  const int64_t blocks = p.blocks, chunks = p.chunks, rows_per = p.rows_per, nbw = p.nb;
  std::shared_ptr<std::vector<float>> partial;
  if (chunks > 1) partial = std::make_shared<std::vector<float>>(chunks * m * n);
  float* part = partial ? partial->data() : nullptr;
  ffi::Error err = qcjax::parallel_for(pool, blocks * chunks, "qcjax_stacked_matmul", [=]() {
    auto scratch = std::make_shared<std::vector<float>>(SCRATCH + 64);
    return [=](int64_t u) {
      float* s = scratch->data();
      const int64_t b = u % blocks, c = u / blocks;
      const int64_t n0 = b * nbw, nb = std::min(nbw, n - n0);
      const int64_t k0 = c * rows_per, k1 = std::min(k, k0 + rows_per);
      if (part == nullptr) {
        unit_rows(x, m, k, w, n, k0, k1, n0, nb, y + n0, n, s);
        if (scale) apply_scale(y, m, n, n0, nb, scale);
      } else {
        unit_rows(x, m, k, w, n, k0, k1, n0, nb, part + c * m * n + n0, n, s);
      }
    };
  });
  if (err.failure() || part == nullptr) return err;
  for (int64_t i = 0; i < m * n; ++i) {  // the chunks' sums in chunk order
    float s = part[i];
    for (int64_t c = 1; c < chunks; ++c) s += part[c * m * n + i];
    y[i] = s;
  }
  if (scale) apply_scale(y, m, n, 0, n, scale);
  return ffi::Error::Success();
}

template <typename T>
ffi::Error with_scale(ffi::ThreadPool pool, const float* x, const T* w, ffi::AnyBuffer scale, int64_t layer,
                      float* y, int64_t m, int64_t k, int64_t n) {
  if (scale.element_count() == 0) return run<T, float>(pool, x, w, nullptr, y, m, k, n);
  switch (scale.element_type()) {
    case ffi::F32:
      return run(pool, x, w, static_cast<const float*>(scale.untyped_data()) + layer * n, y, m, k, n);
    case ffi::BF16:
      return run(pool, x, w, static_cast<const uint16_t*>(scale.untyped_data()) + layer * n, y, m, k, n);
    default:
      return ffi::Error::InvalidArgument("qcjax_stacked_matmul: scale must be float32 or bfloat16");
  }
}

ffi::Error StackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> layer,
                         ffi::AnyBuffer scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || xd[1] != wd[1] || yd.size() != 2 || yd[0] != xd[0] || yd[1] != wd[2] ||
      layer.element_count() != 1 ||
      (scale.element_count() != 0 && int64_t(scale.element_count()) != wd[0] * wd[2])) {
    return ffi::Error::InvalidArgument(
        "qcjax_stacked_matmul: expected x [M, K], w [L, K, N], layer [], scale [L, N] or empty, y [M, N]");
  }
  const int64_t m = xd[0], k = xd[1], n = wd[2], layers = wd[0];
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= layers) return ffi::Error::InvalidArgument("qcjax_stacked_matmul: layer out of range");
  const float* xp = x.typed_data();
  float* out = y->typed_data();
  const int64_t off = l * k * n;
  try {  // nothing may unwind into XLA (an allocation failure for the partial sums or the task queue)
    switch (w.element_type()) {
      case ffi::F32:
        return with_scale(pool, xp, static_cast<const float*>(w.untyped_data()) + off, scale, l, out, m, k, n);
      case ffi::BF16:
        return with_scale(pool, xp, static_cast<const uint16_t*>(w.untyped_data()) + off, scale, l, out, m, k, n);
      case ffi::S8:
        return with_scale(pool, xp, static_cast<const int8_t*>(w.untyped_data()) + off, scale, l, out, m, k, n);
      default:
        return ffi::Error::InvalidArgument("qcjax_stacked_matmul: w must be float32, bfloat16 or int8");
    }
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("qcjax_stacked_matmul: ") + e.what());
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QcjaxStackedMatmul, StackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
