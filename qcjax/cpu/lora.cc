// Per-row LoRA adapters for decode steps, read in place from the adapter bank: for each row m,
//   y[m, :] = (scale[m] * (x[m, :] . a[index[m]])) . b[index[m]]       (index[m] < 0: y[m, :] = 0)
// x [M, K], a [A, K, R], b [A, R, N] (the bank's stacks with layers and slots flattened: index = layer * S + slot),
// all float32 or all bfloat16; float32 sums; the scaled h rounded to the bank's dtype before the second product, as
// the core's XLA formulation (qcjax/row_lora.py) does. y float32 [M, N]. Compiled with the other kernels by
// qcjax/cpu/build.py; called through jax.ffi by qcjax/cpu/lora.py.
//
// Why: XLA:CPU gathers each row's adapter into a new array before its dots (and for a bfloat16 bank widens the copy
// to float32 in a slow loop), so a decode step wrote and re-read every row's adapter; here each row reads its
// adapter's A and B where they are, once.

#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"
#include "simd.h"

namespace ffi = xla::ffi;

namespace {

using namespace qcjax_simd;  // L, f32v, widen, scalar (simd.h)

constexpr int64_t MAX_RANK = 256;

inline float round_bf16(float v) {  // round to nearest even, as XLA's convert
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  if ((b & 0x7f800000u) != 0x7f800000u) b += 0x7fffu + ((b >> 16) & 1u);
  b &= 0xffff0000u;
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

inline void store(float* p, f32v v) { std::memcpy(p, &v, sizeof(v)); }

template <typename T>
void one_row(const T* x, int64_t k, const T* a, const T* b, int64_t r, int64_t n, float s, float* y) {
  float h[MAX_RANK];
  for (int64_t j = 0; j < r; ++j) h[j] = 0.0f;
  const int64_t rv = r / L * L;
  for (int64_t i = 0; i < k; ++i) {  // h += x[i] * a[i, :]
    const float xi = scalar(x[i]);
    const T* ai = a + i * r;
    f32v xs = {};
    xs += xi;
    int64_t j = 0;
    for (; j < rv; j += L) store(h + j, widen(h + j) + xs * widen(ai + j));
    for (; j < r; ++j) h[j] += xi * scalar(ai[j]);
  }
  for (int64_t j = 0; j < r; ++j) {
    h[j] *= s;
    if (sizeof(T) == 2) h[j] = round_bf16(h[j]);
  }
  std::memset(y, 0, sizeof(float) * n);
  const int64_t nv = n / L * L;
  for (int64_t j = 0; j < r; ++j) {  // y += h[j] * b[j, :]
    const T* bj = b + j * n;
    f32v hs = {};
    hs += h[j];
    int64_t o = 0;
    for (; o < nv; o += L) store(y + o, widen(y + o) + hs * widen(bj + o));
    for (; o < n; ++o) y[o] += h[j] * scalar(bj[o]);
  }
}

template <typename T>
ffi::Error run(ffi::ThreadPool pool, const T* x, const T* a, const T* b, const int32_t* index, const float* scale,
               float* y, int64_t m, int64_t k, int64_t r, int64_t n, int64_t adapters) {
  for (int64_t i = 0; i < m; ++i)
    if (index[i] >= adapters) return ffi::Error::InvalidArgument("qcjax_row_lora: an index is past the bank");
  return qcjax::parallel_for(pool, m, "qcjax_row_lora", [&]() {
    return [&](int64_t i) {
      if (index[i] < 0) {
        std::memset(y + i * n, 0, sizeof(float) * n);
        return;
      }
      one_row(x + i * k, k, a + index[i] * k * r, b + index[i] * r * n, r, n, scale[i], y + i * n);
    };
  });
}

ffi::Error RowLora(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer a, ffi::AnyBuffer b,
                   ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || ad.size() != 3 || bd.size() != 3 || ad[0] != bd[0] || ad[1] != xd[1] || ad[2] != bd[1] ||
      yd.size() != 2 || yd[0] != xd[0] || yd[1] != bd[2] || int64_t(index.element_count()) != xd[0] ||
      int64_t(scale.element_count()) != xd[0] || x.element_type() != a.element_type() ||
      a.element_type() != b.element_type() || ad[2] > MAX_RANK) {
    return ffi::Error::InvalidArgument("qcjax_row_lora: expected x [M, K], a [A, K, R], b [A, R, N] of one dtype "
                                       "(R <= 256), index [M], scale [M], y [M, N]");
  }
  const int64_t m = xd[0], k = xd[1], r = ad[2], n = bd[2], adapters = ad[0];
  try {
    switch (x.element_type()) {
      case ffi::F32:
        return run(pool, static_cast<const float*>(x.untyped_data()), static_cast<const float*>(a.untyped_data()),
                   static_cast<const float*>(b.untyped_data()), index.typed_data(), scale.typed_data(),
                   y->typed_data(), m, k, r, n, adapters);
      case ffi::BF16:
        return run(pool, static_cast<const uint16_t*>(x.untyped_data()),
                   static_cast<const uint16_t*>(a.untyped_data()), static_cast<const uint16_t*>(b.untyped_data()),
                   index.typed_data(), scale.typed_data(), y->typed_data(), m, k, r, n, adapters);
      default:
        return ffi::Error::InvalidArgument("qcjax_row_lora: float32 or bfloat16 only");
    }
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("qcjax_row_lora: ") + e.what());
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QcjaxRowLora, RowLora,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
