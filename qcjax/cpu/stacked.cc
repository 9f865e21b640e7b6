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
#include <type_traits>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel.h"
#include "simd.h"

namespace ffi = xla::ffi;

namespace {

using namespace qcjax_simd;  // L, f32v, widen, scalar (simd.h)

#ifndef PREFETCH
#define PREFETCH 1024
#endif
constexpr int64_t NB = 256;  // outputs per column block (the unit's outputs: 8 rows x 256 x 4 B = 8 KiB of L1)


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


#ifdef __AVX512BF16__
// bf16 x (exact bf16 values: a bf16 model's activations) against bf16 or int8 weights (int8 widened to bf16
// exactly): AVX512-BF16 dot products take a pair of weight rows (k, k + 1) per instruction, 32 products, half the
// instructions of the float32 loop above, whose multiplies bound 8-row steps. The pairs are the two rows
// interleaved, per 128-bit lane: a 32-column block's sums sit in the scratch in that order, `slot_column` says
// which column each slot holds, and they are put back in order at the end.
inline int64_t slot_column(int64_t p) { return (p & 15) / 4 * 8 + (p >> 4) * 4 + (p & 3); }

// The end of a bf16 unit: weight rows [kk, k1) (fewer than 4, past the pairs) added one at a time into the slots
// their columns' sums have, then the sums written out in column order.
template <int R, typename T>
void finish_slots(const uint16_t* x, int64_t k, const T* w, int64_t n, int64_t kk, int64_t k1, int64_t n0, int64_t nb,
                  int64_t nv, float* const* acc, float* out, int64_t out_stride) {
  for (; kk < k1; ++kk) {
    const T* w0 = w + kk * n + n0;
    for (int r = 0; r < R; ++r) {
      const float xv = scalar(x[r * k + kk]);
      for (int64_t j = 0; j < nv; ++j) acc[r][j] += xv * scalar(w0[j / 32 * 32 + slot_column(j % 32)]);
      for (int64_t j = nv; j < nb; ++j) acc[r][j] += xv * scalar(w0[j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = out + r * out_stride;
    for (int64_t j = 0; j < nv; ++j) o[j / 32 * 32 + slot_column(j % 32)] = acc[r][j];
    std::memcpy(o + nv, acc[r] + nv, sizeof(float) * (nb - nv));
  }
}

inline __m512i bf16x32(const uint16_t* p) { return _mm512_loadu_si512(p); }
inline __m512i bf16x32(const int8_t* p) {
  // two 16-byte loads folded into the widenings (one 32-byte load and an extract: one more instruction)
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

template <int R, typename T>
void unit_bf16(const uint16_t* x, int64_t k, const T* w, int64_t n, int64_t k0, int64_t k1, int64_t n0, int64_t nb,
               float* out, int64_t out_stride, float* scratch) {
  float* acc[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = scratch + r * nb;
    std::memset(acc[r], 0, sizeof(float) * nb);
  }
  const int64_t nv = nb / 32 * 32;
  const bool whole = nb == n;
  const int64_t row_bytes = nb * int64_t(sizeof(T));
  const int64_t ahead = std::max<int64_t>(4, std::min<int64_t>(32, (2048 / row_bytes + 3) / 4 * 4));
  const int64_t pf = whole ? int64_t(PREFETCH / sizeof(T)) : ahead * n;
  int64_t kk = k0;
  for (; kk + 4 <= k1; kk += 4) {
    const T* w0 = w + kk * n + n0;
    __m512bh p0[R], p1[R];
    for (int r = 0; r < R; ++r) {
      const uint16_t* xr = x + r * k + kk;
      p0[r] = (__m512bh)_mm512_set1_epi32(int(uint32_t(xr[0]) | (uint32_t(xr[1]) << 16)));
      p1[r] = (__m512bh)_mm512_set1_epi32(int(uint32_t(xr[2]) | (uint32_t(xr[3]) << 16)));
    }
    for (int64_t j = 0; j < nv; j += 32) {
      if (j * int64_t(sizeof(T)) % 64 == 0)
        for (int i = 0; i < 4; ++i) __builtin_prefetch(w0 + i * n + j + pf);
      const __m512i a = bf16x32(w0 + j), b = bf16x32(w0 + n + j), c = bf16x32(w0 + 2 * n + j),
                    d = bf16x32(w0 + 3 * n + j);
      const __m512bh ab_lo = (__m512bh)_mm512_unpacklo_epi16(a, b), ab_hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
      const __m512bh cd_lo = (__m512bh)_mm512_unpacklo_epi16(c, d), cd_hi = (__m512bh)_mm512_unpackhi_epi16(c, d);
      for (int r = 0; r < R; ++r) {
        __m512 lo = _mm512_loadu_ps(acc[r] + j), hi = _mm512_loadu_ps(acc[r] + j + 16);
        lo = _mm512_dpbf16_ps(_mm512_dpbf16_ps(lo, ab_lo, p0[r]), cd_lo, p1[r]);
        hi = _mm512_dpbf16_ps(_mm512_dpbf16_ps(hi, ab_hi, p0[r]), cd_hi, p1[r]);
        _mm512_storeu_ps(acc[r] + j, lo);
        _mm512_storeu_ps(acc[r] + j + 16, hi);
      }
    }
    for (int64_t j = nv; j < nb; ++j)
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < 4; ++i) acc[r][j] += scalar(x[r * k + kk + i]) * scalar(w0[i * n + j]);
  }
  finish_slots<R>(x, k, w, n, kk, k1, n0, nb, nv, acc, out, out_stride);
}

// The same sums with the unit's outputs held in registers: column strips of 32 outputs (S strips at a time, 2 R S
// accumulators), each walking the unit's weight rows two at a time, x's pair broadcast from memory. The rows
// (k, k + 1) of a strip are one cache line each, read once; there is no load and store of the sums per weight row
// (which bound unit_bf16 at several rows: 16 loads and 16 stores per 32 dot products). The sums are added in the
// same order as unit_bf16's (pairs in row order, rows past the last group of 4 one at a time).
template <int R, int S, typename T>
void unit_bf16_reg(const uint16_t* x, int64_t k, const T* w, int64_t n, int64_t k0, int64_t k1, int64_t n0,
                   int64_t nb, float* out, int64_t out_stride, float* scratch) {
  float* acc[R];
  for (int r = 0; r < R; ++r) acc[r] = scratch + r * nb;
  const int64_t nv = nb / 32 * 32;
  const int64_t k4 = k0 + (k1 - k0) / 4 * 4;  // rows [k0, k4) in pairs; [k4, k1) one at a time
  // Blocks of KB weight rows: a block's row segments are read whole, strip by strip, while the sums stay in
  // registers; D rows ahead prefetched. Measured on the 0.5B's shapes at 8 rows (EPYC Zen 5, 2 threads, medians of
  // 21): KB 16 / D 32 0.96-1.03 ms per layer's projections; KB 8 1.09-1.10; D 8 1.35; unit_bf16 1.51-1.56.
  constexpr int64_t KB = 16, D = 32;
  for (int r = 0; r < R; ++r) std::memset(acc[r], 0, sizeof(float) * nb);
  for (int64_t kb0 = k0; kb0 < k4; kb0 += KB) {  // blocks of KB weight rows: each row's segment read whole
    const int64_t kb1 = std::min(k4, kb0 + KB);
    int64_t j = 0;
    auto strips = [&](auto s_count) {
      constexpr int SS = decltype(s_count)::value;
      __m512 lo[R][SS], hi[R][SS];
      for (int r = 0; r < R; ++r)
        for (int s = 0; s < SS; ++s) {
          lo[r][s] = _mm512_loadu_ps(acc[r] + j + 32 * s);
          hi[r][s] = _mm512_loadu_ps(acc[r] + j + 32 * s + 16);
        }
      const T* w0 = w + n0 + j;
      for (int64_t kk = kb0; kk < kb1; kk += 2) {
        const T* wr = w0 + kk * n;
        for (int s = 0; s < SS; ++s) {
          __builtin_prefetch(wr + D * n + 32 * s);
          __builtin_prefetch(wr + (D + 1) * n + 32 * s);
        }
        __m512bh plo[SS], phi[SS];
        for (int s = 0; s < SS; ++s) {
          const __m512i a = bf16x32(wr + 32 * s), b = bf16x32(wr + n + 32 * s);
          plo[s] = (__m512bh)_mm512_unpacklo_epi16(a, b);
          phi[s] = (__m512bh)_mm512_unpackhi_epi16(a, b);
        }
        for (int r = 0; r < R; ++r) {
          int32_t pair;
          std::memcpy(&pair, x + r * k + kk, sizeof(pair));
          const __m512bh xp = (__m512bh)_mm512_set1_epi32(pair);
          for (int s = 0; s < SS; ++s) {
            lo[r][s] = _mm512_dpbf16_ps(lo[r][s], plo[s], xp);
            hi[r][s] = _mm512_dpbf16_ps(hi[r][s], phi[s], xp);
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int s = 0; s < SS; ++s) {
          _mm512_storeu_ps(acc[r] + j + 32 * s, lo[r][s]);
          _mm512_storeu_ps(acc[r] + j + 32 * s + 16, hi[r][s]);
        }
      j += 32 * SS;
    };
    while (j + 32 * S <= nv) strips(std::integral_constant<int, S>());
    while (j < nv) strips(std::integral_constant<int, 1>());
  }
  for (int64_t jj = nv; jj < nb; ++jj)  // columns past the strips: unit_bf16's order
    for (int r = 0; r < R; ++r) {
      float sum = 0.f;
      for (int64_t kk = k0; kk < k4; kk += 4)
        for (int i = 0; i < 4; ++i) sum += scalar(x[r * k + kk + i]) * scalar(w[(kk + i) * n + n0 + jj]);
      acc[r][jj] = sum;
    }
  finish_slots<R>(x, k, w, n, k4, k1, n0, nb, nv, acc, out, out_stride);
}
#endif


// x rows in blocks of 8 through the unit for their count; bf16 x takes the bf16 dot products where the build has
// them and the weights are bf16 or int8 (else x widened to float32, `xf`).
template <typename T>
void unit_rows(const float* xf, const uint16_t* xb, int64_t m, int64_t k, const T* w, int64_t n, int64_t k0,
               int64_t k1, int64_t n0, int64_t nb, float* out, int64_t out_stride, float* scratch) {
#ifdef __AVX512BF16__
  if constexpr (sizeof(T) <= 2) {
    if (xb != nullptr) {
      for (int64_t m0 = 0; m0 < m; m0 += 8) {
        const uint16_t* xr = xb + m0 * k;
        float* ob = out + m0 * out_stride;
        switch (std::min<int64_t>(8, m - m0)) {  // one row: unit_bf16 streams faster; several: sums in registers
          case 1: unit_bf16<1>(xr, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
          case 2: unit_bf16_reg<2, 4>(xr, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
          case 3: unit_bf16_reg<3, 2>(xr, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
          case 4: unit_bf16_reg<4, 2>(xr, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
          case 5: unit_bf16_reg<5, 1>(xr, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
          case 6: unit_bf16_reg<6, 1>(xr, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
          case 7: unit_bf16_reg<7, 1>(xr, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
          default: unit_bf16_reg<8, 1>(xr, k, w, n, k0, k1, n0, nb, ob, out_stride, scratch); break;
        }
      }
      return;
    }
  }
#endif
  const float* x = xf;
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
// at one row, while a unit can keep the sums of whole output rows (n x min(m, 8) <= SCRATCH floats), units are chunks
// of whole weight rows (contiguous memory, the stream the hardware prefetcher follows) whose partial sums are added in
// chunk order; wider outputs are cut into column blocks (row segments of >= 256 outputs). At several rows, where the
// sums bound the work more than the stream, outputs wider than NB are always cut into column blocks of NB.
struct Plan {
  int64_t nb, blocks, chunks, rows_per;
};

Plan plan(int64_t m, int64_t k, int64_t n) {
  Plan p;
  const int64_t cap = SCRATCH / std::min<int64_t>(8, m);
  if (n <= cap && !(m >= 2 && n > NB)) {
    p.nb = n;
    p.blocks = 1;
    // several rows against a narrow weight (k/v): one chunk per thread of two; more left the call to its overheads
    p.chunks = std::max<int64_t>(1, std::min<int64_t>(m >= 2 ? 2 : UNITS, k / 64));
  } else {  // column blocks: of NB at several rows (whole rows in chunks left 14 partial sums to add), else wider
    p.nb = m >= 2 ? NB : std::min(cap, std::max(NB, (n + UNITS - 1) / UNITS / L * L + L));
    p.blocks = (n + p.nb - 1) / p.nb;
    p.chunks = p.blocks >= UNITS / 2
                   ? 1
                   : std::max<int64_t>(1, std::min<int64_t>((UNITS + p.blocks - 1) / p.blocks, k / 128));
  }
  p.rows_per = (k + p.chunks - 1) / p.chunks;
  p.chunks = (k + p.rows_per - 1) / p.rows_per;
  return p;
}

template <typename T, typename S>
ffi::Error run(ffi::ThreadPool pool, const float* x, const uint16_t* xb, const T* w, const S* scale, float* y,
               int64_t m, int64_t k, int64_t n) {
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
        unit_rows(x, xb, m, k, w, n, k0, k1, n0, nb, y + n0, n, s);
        if (scale) apply_scale(y, m, n, n0, nb, scale);
      } else {
        unit_rows(x, xb, m, k, w, n, k0, k1, n0, nb, part + c * m * n + n0, n, s);
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
ffi::Error with_scale(ffi::ThreadPool pool, const float* x, const uint16_t* xb, const T* w, ffi::AnyBuffer scale,
                      int64_t layer, float* y, int64_t m, int64_t k, int64_t n) {
  if (scale.element_count() == 0) return run<T, float>(pool, x, xb, w, nullptr, y, m, k, n);
  switch (scale.element_type()) {
    case ffi::F32:
      return run(pool, x, xb, w, static_cast<const float*>(scale.untyped_data()) + layer * n, y, m, k, n);
    case ffi::BF16:
      return run(pool, x, xb, w, static_cast<const uint16_t*>(scale.untyped_data()) + layer * n, y, m, k, n);
    default:
      return ffi::Error::InvalidArgument("qcjax_stacked_matmul: scale must be float32 or bfloat16");
  }
}

ffi::Error StackedMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> layer,
                         ffi::AnyBuffer scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || xd[1] != wd[1] || yd.size() != 2 || yd[0] != xd[0] || yd[1] != wd[2] ||
      layer.element_count() != 1 || (x.element_type() != ffi::F32 && x.element_type() != ffi::BF16) ||
      (scale.element_count() != 0 && int64_t(scale.element_count()) != wd[0] * wd[2])) {
    return ffi::Error::InvalidArgument("qcjax_stacked_matmul: expected x [M, K] float32 or bfloat16, w [L, K, N], "
                                       "layer [], scale [L, N] or empty, y [M, N]");
  }
  const int64_t m = xd[0], k = xd[1], n = wd[2], layers = wd[0];
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= layers) return ffi::Error::InvalidArgument("qcjax_stacked_matmul: layer out of range");
  float* out = y->typed_data();
  const int64_t off = l * k * n;
  try {  // nothing may unwind into XLA (an allocation failure for the partial sums or the task queue)
    // bf16 x: as it is for the bf16 dot products (bf16 or int8 weights, where built), widened to float32 for the rest
    const uint16_t* xb = x.element_type() == ffi::BF16 ? static_cast<const uint16_t*>(x.untyped_data()) : nullptr;
    std::vector<float> wide;
    const float* xf = xb == nullptr ? static_cast<const float*>(x.untyped_data()) : nullptr;
#ifdef __AVX512BF16__
    const bool widen_x = xb != nullptr && w.element_type() == ffi::F32;  // bf16 dot products take the bf16 rows
#else
    const bool widen_x = xb != nullptr;
#endif
    if (widen_x) {
      wide.resize(m * k);
      for (int64_t i = 0; i < m * k; ++i) wide[i] = scalar(xb[i]);
      xf = wide.data();
    }
    switch (w.element_type()) {
      case ffi::F32:
        return with_scale(pool, xf, nullptr, static_cast<const float*>(w.untyped_data()) + off, scale, l, out, m, k,
                          n);
      case ffi::BF16:
        return with_scale(pool, xf, xb, static_cast<const uint16_t*>(w.untyped_data()) + off, scale, l, out, m, k, n);
      case ffi::S8:
        return with_scale(pool, xf, xb, static_cast<const int8_t*>(w.untyped_data()) + off, scale, l, out, m, k, n);
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
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
