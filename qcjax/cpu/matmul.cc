// Few-row matmul for decoding on the CPU: y[M, N] = x[M, K] . w[N, K]^T, x and w both float32 or both bfloat16,
// y float32 (float32 accumulation). Compiled and loaded by qcjax/cpu/build.py; called through jax.ffi (qcjax/cpu/matmul.py).
//
// Why: a decode step is a handful of rows against every weight, so its cost should be one read of the weights. XLA:CPU's
// GEMM kernels for 1-8 rows read fp32 weights at ~10-13 GB/s and bf16 ones at ~1-13 GB/s on a machine that reads
// ~25 GB/s (docs/sampling.md, "The CPU path"). Here each weight row is loaded once and multiplied into every x row while it is hot;
// the N rows are shared out over XLA's intra-op threads (parallel.h).
//
// fp32: GCC/Clang vector extensions, one register's lanes (16 floats with AVX-512, 8 with AVX2). bf16: AMX tiles
// from 3 rows, AVX512-BF16 dot products below that, and where the CPU has neither, the weights widened to fp32 in
// the loop against x widened once. Built with -march=native by the loader, so what the CPU lacks is compiled out.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>

#if defined(__AVX512BF16__) || defined(__AMX_BF16__)
#include <immintrin.h>
#endif
#include <vector>
#ifdef __AMX_BF16__
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel.h"
#include "simd.h"

namespace ffi = xla::ffi;

namespace {

using namespace qcjax_simd;  // L, f32v, widen, scalar (simd.h)

inline float hsum(f32v v) {
  float s = 0.f;
  for (int i = 0; i < L; ++i) s += v[i];
  return s;
}

// Bytes ahead of the weight row being read to prefetch: with the hardware prefetcher alone the loop waited on memory.
// AVX-512 (Sapphire Rapids, 0.5B shapes, 1-8 rows, 1 GiB weight): 1024 -> 2048 gained up to 1.3x, 4096 no more. AVX2
// (Zen 3, same shapes): 1024 (8 rows 15.2 GB/s vs 14.2 with none; bf16 one row 42-46 ms per 0.5B step vs 43-56 with
// none), except for fp32 at one row, the plain stream the hardware prefetcher follows, where 1024 got in its way:
// 256 (the 0.5B step's 169 calls alone, alternated processes: 79.1 / 79.5 / 77.8 ms at 1024, 75.0 / 77.6 / 72.3 at
// 256, 76.9 / 69.8 / 73.4 with none; one row, one thread: 15.4 vs 14.7 GB/s, a plain sum 17.2); AVX-512 at 4-8 rows (EPYC
// Zen 5, the 0.5B's head, alternated processes): 4096 (fp32 8 rows 17.5-17.9 ms at 2048, 14.1-16.1 at 4096; bf16
// 9.0 -> 7.2 ms).
template <int R, typename T>
constexpr int prefetch_bytes() {
#ifdef PREFETCH
  return PREFETCH;
#elif defined(__AVX512F__)
  return R >= 4 ? 4096 : 2048;
#else
  return R == 1 && sizeof(T) == 4 ? 256 : 1024;
#endif
}

// Weight rows [n0, n1) of w against R (<= 8) rows of x from x0 (same element type T: float or bfloat16 bits);
// writes y[r, n]. Products are exact in float32 (bf16 x bf16 fits), sums are float32. On AVX2, U independent
// accumulators per x row (U * L weights a step) keep ~4 FMA chains in flight when R is small (2 or 8 chains at one
// row: no faster on Zen 3). (Tried: two weight rows per
// pass to load each x vector once for both, and non-temporal prefetches; both slower.)
template <int R, typename X, typename T>
void rows_block(const X* x0, const T* w, float* y0, int64_t k, int64_t n_total, int64_t n0, int64_t n1) {
  constexpr int U = (L == 16 || R >= 4) ? 1 : 4 / R;
  for (int64_t n = n0; n < n1; ++n) {
    const T* wr = w + n * k;
    f32v acc[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = f32v{};
    int64_t i = 0;
#ifdef __AVX512BF16__
    if constexpr (sizeof(T) == 2 && sizeof(X) == 2) {  // 32 bf16 pairs per instruction, no widening
      for (; i + 32 <= k; i += 32) {
        __builtin_prefetch(wr + i + prefetch_bytes<R, T>() / sizeof(T));
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + i);
        for (int r = 0; r < R; ++r) {
          acc[r][0] = (f32v)_mm512_dpbf16_ps((__m512)acc[r][0], wv, (__m512bh)_mm512_loadu_si512(x0 + r * k + i));
        }
      }
    }
#endif
    for (; i + U * L <= k; i += U * L) {
      __builtin_prefetch(wr + i + prefetch_bytes<R, T>() / sizeof(T));
      for (int b = 64; b < int(U * L * sizeof(T)); b += 64)
        __builtin_prefetch(wr + i + (b + prefetch_bytes<R, T>()) / sizeof(T));
      for (int u = 0; u < U; ++u) {
        const f32v wv = widen(wr + i + u * L);
        for (int r = 0; r < R; ++r) acc[r][u] += wv * widen(x0 + r * k + i + u * L);
      }
    }
    for (; i + L <= k; i += L) {
      const f32v wv = widen(wr + i);
      for (int r = 0; r < R; ++r) acc[r][0] += wv * widen(x0 + r * k + i);
    }
    for (int r = 0; r < R; ++r) {
      f32v a = acc[r][0];
      for (int u = 1; u < U; ++u) a += acc[r][u];
      float s = hsum(a);
      for (int64_t j = i; j < k; ++j) s += scalar(wr[j]) * scalar(x0[r * k + j]);
      y0[r * n_total + n] = s;
    }
  }
}

#ifdef __AVX512BF16__
// 16 vectors -> one: lane (i % 4) * 4 + i / 4 holds the sum of v[i]'s lanes (a tree of 15 shuffles-and-adds, in
// place of 16 one-lane sums of 16 steps each, which cost as much as the dot products at 8 rows).
inline __m512 reduce16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))));
}

// bf16 at 4-8 x rows: G = 16 / R weight rows at a time, so the R x G sums of a group end in one reduce16 (rows past
// n1 repeat the last one and are dropped). The 0.5B's head (EPYC Zen 5, 2 threads, medians of 15): 8 rows 11.1 ->
// 10.2 ms, 4 rows 9.5 -> 7.5 ms (then 7.2 at 8 rows with prefetch_bytes' 4096).
template <int R>
void rows_block_bf16(const uint16_t* x0, const uint16_t* w, float* y0, int64_t k, int64_t n_total, int64_t n0,
                     int64_t n1) {
  constexpr int G = 16 / R;
  const int64_t kv = k / 32 * 32;
  for (int64_t n = n0; n < n1; n += G) {
    const uint16_t* wr[G];
    for (int g = 0; g < G; ++g) wr[g] = w + std::min(n + g, n1 - 1) * k;
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t i = 0; i < kv; i += 32) {
      __m512bh wv[G];
      for (int g = 0; g < G; ++g) {
        __builtin_prefetch(wr[g] + i + prefetch_bytes<R, uint16_t>() / 2);
        wv[g] = (__m512bh)_mm512_loadu_si512(wr[g] + i);
      }
      for (int r = 0; r < R; ++r) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x0 + r * k + i);
        for (int g = 0; g < G; ++g) acc[r * G + g] = _mm512_dpbf16_ps(acc[r * G + g], wv[g], xv);
      }
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, reduce16(acc));
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G && n + g < n1; ++g) {
        const int i = r * G + g;
        float s = sums[(i % 4) * 4 + i / 4];
        for (int64_t j = kv; j < k; ++j) s += scalar(wr[g][j]) * scalar(x0[r * k + j]);
        y0[r * n_total + n + g] = s;
      }
  }
}
#endif

template <typename X, typename T>
void rows_tile(const X* x, const T* w, float* y, int64_t m, int64_t k, int64_t n, int64_t n0, int64_t n1);

// Every weight row meets all m x rows while it is in cache: blocks of 8 x rows over tiles of weight rows small
// enough for L2 (64 KiB), so each weight row is read from memory once however many blocks of x rows there are.
template <typename X, typename T>
void rows(const X* x, const T* w, float* y, int64_t m, int64_t k, int64_t n, int64_t n0, int64_t n1) {
  if (m <= 8) return rows_tile(x, w, y, m, k, n, n0, n1);
  const int64_t tile = std::max<int64_t>(16, 65536 / (k * int64_t(sizeof(T))));
  for (int64_t t = n0; t < n1; t += tile) rows_tile(x, w, y, m, k, n, t, std::min(n1, t + tile));
}

template <typename X, typename T>
void rows_tile(const X* x, const T* w, float* y, int64_t m, int64_t k, int64_t n, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < m; m0 += 8) {
    const X* xb = x + m0 * k;
    float* yb = y + m0 * n;
#ifdef __AVX512BF16__
    if constexpr (sizeof(T) == 2 && sizeof(X) == 2) {
      if (m - m0 >= 4) {  // (2-3 rows: the loop below streams faster, 6.1 vs 7.7 ms for the 0.5B head at 2)
        switch (std::min<int64_t>(8, m - m0)) {
          case 4: rows_block_bf16<4>(xb, w, yb, k, n, n0, n1); break;
          case 5: rows_block_bf16<5>(xb, w, yb, k, n, n0, n1); break;
          case 6: rows_block_bf16<6>(xb, w, yb, k, n, n0, n1); break;
          case 7: rows_block_bf16<7>(xb, w, yb, k, n, n0, n1); break;
          default: rows_block_bf16<8>(xb, w, yb, k, n, n0, n1); break;
        }
        continue;
      }
    }
#endif
    switch (std::min<int64_t>(8, m - m0)) {
      case 1: rows_block<1>(xb, w, yb, k, n, n0, n1); break;
      case 2: rows_block<2>(xb, w, yb, k, n, n0, n1); break;
      case 3: rows_block<3>(xb, w, yb, k, n, n0, n1); break;
      case 4: rows_block<4>(xb, w, yb, k, n, n0, n1); break;
      case 5: rows_block<5>(xb, w, yb, k, n, n0, n1); break;
      case 6: rows_block<6>(xb, w, yb, k, n, n0, n1); break;
      case 7: rows_block<7>(xb, w, yb, k, n, n0, n1); break;
      default: rows_block<8>(xb, w, yb, k, n, n0, n1); break;
    }
  }
}

#ifdef __AMX_BF16__
// bf16 on AMX: a tile multiply takes 16 weight rows x 32 k against 16 x rows at once, so the loop is bound by the
// weight stream alone at any row count (the AVX512-BF16 loop above is bound by its own arithmetic at 8 rows).

bool amx_permitted() {  // Linux hands a process AMX's tile state only on request (once, for all its threads)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// x [m, k] bf16 -> AMX's B operand ("VNNI" pairs), per block of 16 x rows and 32-wide k step: 16 rows (k pairs) x
// 16 columns (x rows, zero past m) x 2. Layout: [m / 16][k / 32][16][16][2].
std::vector<uint16_t> pack_x(const uint16_t* x, int64_t m, int64_t k) {
  const int64_t mb = (m + 15) / 16, steps = k / 32;
  std::vector<uint16_t> out(mb * steps * 512, 0);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t s = 0; s < steps; ++s)
      for (int p = 0; p < 16; ++p)
        for (int q = 0; q < 2; ++q) out[((r / 16 * steps + s) * 16 + p) * 32 + (r % 16) * 2 + q] = x[r * k + s * 32 + 2 * p + q];
  return out;
}

// Weight rows [n0, n1) against all m x rows: 16 weight rows x 16 x rows per tile multiply (C tile 0 accumulates
// over the 32-wide k steps, A = weight tile 4, B = packed x tile 5); the rows past the last full 16 (and k past the
// last full 32) with the vector code above.
void amx_rows(const uint16_t* x, const uint16_t* xp, const uint16_t* w, float* y, int64_t m, int64_t k,
              int64_t n_total, int64_t n0, int64_t n1) {
  TileConfig cfg;
  for (int t : {0, 4, 5}) cfg.rows[t] = 16, cfg.colsb[t] = 64;  // C: [16 n x 16 m] f32; A: [16 n x 32 k]; B
  _tile_loadconfig(&cfg);
  alignas(64) float c[16][16];
  const int64_t steps = k / 32, kv = steps * 32;
  int64_t n = n0;
  for (; n + 16 <= n1; n += 16) {
    const uint16_t* wb = w + n * k;
    for (int64_t m0 = 0; m0 < m; m0 += 16) {
      const uint16_t* xb = xp + m0 / 16 * steps * 512;
      _tile_zero(0);
      for (int64_t s = 0; s < steps; ++s) {
        if (m0 == 0)  // the next 16 weight rows are the next 16 * k contiguous values: stream them in, 16 lines a step
          for (int i = 0; i < 16; ++i) __builtin_prefetch(wb + 16 * k + (s * 16 + i) * 32);
        _tile_loadd(4, wb + s * 32, k * 2);
        _tile_loadd(5, xb + s * 512, 64);
        _tile_dpbf16ps(0, 4, 5);
      }
      _tile_stored(0, c, 64);
      for (int64_t j = m0; j < std::min(m, m0 + 16); ++j) {
        for (int r = 0; r < 16; ++r) {
          float t = c[r][j - m0];
          for (int64_t i = kv; i < k; ++i) t += scalar(wb[r * k + i]) * scalar(x[j * k + i]);
          y[j * n_total + n + r] = t;
        }
      }
    }
  }
  _tile_release();
  if (n < n1) rows(x, w, y, m, k, n_total, n, n1);
}
#endif

// One chunk of weight rows: on AMX when x was packed for it, else the vector loop (on x widened to float32 when
// that was done).
template <typename T>
void chunk_rows(const T* x, [[maybe_unused]] const std::vector<uint16_t>* packed, const std::vector<float>* wide,
                const T* w, float* y, int64_t m, int64_t k, int64_t n, int64_t n0, int64_t n1) {
#ifdef __AMX_BF16__
  if constexpr (sizeof(T) == 2) {
    if (packed) return amx_rows(x, packed->data(), w, y, m, k, n, n0, n1);
  }
#endif
  if (wide) return rows(wide->data(), w, y, m, k, n, n0, n1);
  rows(x, w, y, m, k, n, n0, n1);
}

template <typename T>
ffi::Error run(ffi::ThreadPool pool, const T* x, const T* w, float* y, int64_t m, int64_t k, int64_t n) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // ~16 chunks per thread, so a helper that wakes late still gets its share (0.5B fp32 decode, alternated runs:
  // batch-1 steps 96-100 ms with 4 chunks per thread, 82-95 with 16); a multiple of 16 rows (AMX tiles).
  const int64_t chunk = std::max<int64_t>(16, ((n + 16 * threads - 1) / (16 * threads) + 15) / 16 * 16);
  std::shared_ptr<const std::vector<uint16_t>> packed;
  std::shared_ptr<const std::vector<float>> wide;
#ifdef __AMX_BF16__
  if constexpr (sizeof(T) == 2) {  // 1-2 rows: the AVX512-BF16 loop streams faster (~20 vs ~17 GB/s, 0.5B shapes)
    if (m > 2 && k >= 32 && amx_permitted()) packed = std::make_shared<const std::vector<uint16_t>>(pack_x(x, m, k));
  }
#endif
#ifndef __AVX512BF16__
  // bf16 without bf16 dot products: widen x once here, so the loop widens only the weights (Zen 3, 8 rows: widening
  // both in the loop read 4 GB/s, below XLA's 6).
  if constexpr (sizeof(T) == 2) {
    auto v = std::make_shared<std::vector<float>>(m * k);
    for (int64_t i = 0; i < m * k; ++i) (*v)[i] = scalar(x[i]);
    wide = v;
  }
#endif
  return qcjax::parallel_for(pool, (n + chunk - 1) / chunk, "qcjax_rows_matmul", [=]() {
    return [=](int64_t c) {
      chunk_rows(x, packed.get(), wide.get(), w, y, m, k, n, c * chunk, std::min(n, (c + 1) * chunk));
    };
  });
}

ffi::Error RowsMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || x.element_type() != w.element_type() ||
      yd.size() != 2 || yd[0] != xd[0] || yd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("qcjax_rows_matmul: expected x [M, K] and w [N, K] of one dtype, y [M, N]");
  }
  const int64_t m = xd[0], k = xd[1], n = wd[0];
  float* out = y->typed_data();
  try {  // nothing may unwind into XLA (an allocation failure in the packing or the task queue)
    switch (w.element_type()) {
      case ffi::F32:
        return run(pool, static_cast<const float*>(x.untyped_data()), static_cast<const float*>(w.untyped_data()),
                   out, m, k, n);
      case ffi::BF16:
        return run(pool, static_cast<const uint16_t*>(x.untyped_data()),
                   static_cast<const uint16_t*>(w.untyped_data()), out, m, k, n);
      default:
        return ffi::Error::InvalidArgument("qcjax_rows_matmul: x and w must be float32 or bfloat16");
    }
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("qcjax_rows_matmul: ") + e.what());
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QcjaxRowsMatmul, RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Floats per vector in this build (16 with AVX-512, else 8); for tests that check the build matches the CPU.
extern "C" int QcjaxLanes() { return L; }

// Whether bf16 goes through AMX tiles (from 3 rows) in this build on this machine; for reports and tests.
extern "C" int QcjaxAmxBf16() {
#ifdef __AMX_BF16__
  return amx_permitted() ? 1 : 0;
#else
  return 0;
#endif
}
