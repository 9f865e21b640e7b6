// Causal self-attention over a prompt on the CPU (flash-style): out[b, i, h] = softmax_j(q_i . k_j * scale) v_j over
// keys j <= i of query i's own segment, grouped-query (query head h reads KV head h / (H / KV)). float32 in and out.
// Compiled with matmul.cc into one library by qcjax/cpu/build.py; called through jax.ffi by
// qcjax/cpu/attention.py.
//
// Why: XLA:CPU runs the reference attention (qcjax/attention/xla.py) as dozens of small ops per layer: scores
// materialised, masked, reduced and normalised in separate passes, with transposes between (0.5B fp32, 512 tokens:
// ~10 ms of a ~120 ms layer). Here a tile of queries of one KV head's group (every query head that reads it) runs
// against one block of keys at a time with an online softmax, so the scores stay in cache, key blocks above the
// diagonal are never computed, and each key block is packed once for all the group's heads.
//
// Vectors are 8 floats (AVX2's width; also what AVX-512 builds use here): head dims are multiples of 8.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i8v __attribute__((vector_size(32)));

constexpr int RG = 6;   // rows per register block: 6 rows x 16 floats = 12 of AVX2's 16 registers
constexpr int TQ = 48;  // query positions per tile (times the group's heads: the tile's rows); a multiple of RG
constexpr int BK = 64;  // keys per block
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// e^x to ~2 ulp (Cephes' expf polynomial after x = n ln2 + r), exactly 0 below -87 (so also for -inf).
inline v8 exp8(v8 x) {
  const v8 lo = splat(-87.0f), hi = splat(88.0f);
  v8 xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const v8 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  v8 t = xc * 1.44269504088896341f + magic;
  v8 n = t - magic;
  v8 r = xc - n * 0.693359375f - n * -2.12194440e-4f;
  v8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  v8 y = p * r * r + r + 1.0f;
  i8v bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits - 0x4B400000 + 127) << 23;  // 2^n
  v8 two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < lo ? splat(0.0f) : y * two_n;
}

inline float hsum(v8 v) {
  float s = 0;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

struct Shape {
  int64_t b, t, h, kv, d;
};

// One tile: queries [q0, q0 + nq) of batch row `b` for every query head of KV head `kh`.
struct Tile {
  std::vector<float> q, o, kt, s;  // q, o [rows, d]; kt [d, BK] (the key block transposed); s [RG, BK]
  std::vector<float> m, l;         // per row: running max, running sum
  std::vector<int64_t> pos;        // per row: query position, -1 past the end
  std::vector<int32_t> seg;        // per row: query segment

  void run(const Shape& z, const float* q_in, const float* k_in, const float* v_in, const int32_t* qs,
           const int32_t* ks, float* out, float scale, int64_t b, int64_t kh, int64_t q0) {
    const int64_t g = z.h / z.kv, d = z.d, nq = std::min<int64_t>(TQ, z.t - q0), rows = g * TQ;
    q.assign(rows * d, 0.0f);
    o.assign(rows * d, 0.0f);
    kt.resize(d * BK);
    s.resize(RG * BK);
    m.assign(rows, NEG_INF);
    l.assign(rows, 0.0f);
    pos.assign(rows, -1);
    seg.assign(rows, 0);
    const int32_t* qsb = qs + b * z.t;
    const int32_t* ksb = ks + b * z.t;
    bool one_seg = true;  // every query of the tile in the same segment
    for (int64_t gi = 0; gi < g; ++gi) {
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t r = gi * TQ + i, p = q0 + i;
        pos[r] = p;
        seg[r] = qsb[p];
        one_seg &= qsb[p] == qsb[q0];
        const float* src = q_in + ((b * z.t + p) * z.h + kh * g + gi) * d;
        for (int64_t c = 0; c < d; ++c) q[r * d + c] = src[c] * scale;
      }
    }
    const int64_t kend = q0 + nq;  // causal: no query of the tile sees a key at or past kend
    for (int64_t kb = 0; kb < kend; kb += BK) {
      const int64_t nk = std::min<int64_t>(BK, kend - kb);
      const bool causal = kb + nk - 1 > q0 || nk < BK;
      bool segments = !one_seg;
      for (int64_t c = 0; c < nk && !segments; ++c) segments = ksb[kb + c] != qsb[q0];
      for (int64_t c = 0; c < nk; ++c) {
        const float* src = k_in + ((b * z.t + kb + c) * z.kv + kh) * d;
        for (int64_t e = 0; e < d; ++e) kt[e * BK + c] = src[e];
      }
      for (int64_t c = nk; c < BK; ++c) {
        for (int64_t e = 0; e < d; ++e) kt[e * BK + c] = 0.0f;
      }
      for (int64_t r0 = 0; r0 < rows; r0 += RG) {
        // The register block's rows are consecutive positions of one head (TQ is a multiple of RG): they see at most
        // the block's first `see` keys, computed in whole 16-key groups.
        int64_t last = -1;
        for (int r = 0; r < RG; ++r) last = std::max(last, pos[r0 + r]);
        const int64_t see = std::min(nk, last - kb + 1);
        if (see <= 0) continue;  // above the diagonal, or rows past the end: nothing to add
        const int ncols = static_cast<int>((see + 15) / 16 * 16);
        scores(r0, d, ncols);
        float corr[RG];
        softmax_block(r0, kb, see, ncols, causal, segments, ksb, corr);
        accumulate(r0, corr, v_in + ((b * z.t + kb) * z.kv + kh) * d, z.kv * d, see, d);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (pos[r] < 0) continue;
      const float inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;  // l is 0 only for a query that sees no key (none here)
      float* dst = out + ((b * z.t + pos[r]) * z.h + kh * g + r / TQ) * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = o[r * d + c] * inv;
    }
  }

  // s[RG, :ncols] = q[r0 .. r0 + RG] . kt: RG rows x 16 keys per pass.
  __attribute__((noinline)) void scores(int64_t r0, int64_t d, int ncols) {
    for (int c0 = 0; c0 < ncols; c0 += 16) {
      v8 acc[RG][2] = {};
      for (int64_t e = 0; e < d; ++e) {
        const v8 k0 = load8(&kt[e * BK + c0]), k1 = load8(&kt[e * BK + c0 + 8]);
        for (int r = 0; r < RG; ++r) {
          const v8 qb = splat(q[(r0 + r) * d + e]);
          acc[r][0] += qb * k0;
          acc[r][1] += qb * k1;
        }
      }
      for (int r = 0; r < RG; ++r) {
        store8(&s[r * BK + c0], acc[r][0]);
        store8(&s[r * BK + c0 + 8], acc[r][1]);
      }
    }
  }

  // The block's scores of rows r0 .. r0 + RG (the first ncols) -> probabilities in place, with each row's running
  // max and sum updated; corr gets the factors the rows' accumulated outputs are rescaled by. `causal`: keys past a
  // row's position or past nk are masked; `segments`: keys of other segments too.
  __attribute__((noinline)) void softmax_block(int64_t r0, int64_t kb, int64_t nk, int ncols, bool causal,
                                               bool segments, const int32_t* ksb, float* corr) {
    const v8 lane = {0, 1, 2, 3, 4, 5, 6, 7}, neg_inf = splat(NEG_INF);
    v8 mold = neg_inf, mnew = neg_inf;
    for (int r = 0; r < RG; ++r) {
      float* row = &s[r * BK];
      const int64_t p = pos[r0 + r];
      if (causal) {  // keys kb + c with c >= see are masked
        const float see = static_cast<float>(std::clamp<int64_t>(p - kb + 1, 0, nk));
        for (int c = 0; c < ncols; c += 8) {
          const v8 x = load8(row + c);
          store8(row + c, lane + static_cast<float>(c) < see ? x : neg_inf);
        }
      }
      if (segments) {
        for (int64_t c = 0; c < nk; ++c) {
          if (ksb[kb + c] != seg[r0 + r]) row[c] = NEG_INF;
        }
      }
      v8 mx = neg_inf;
      for (int c = 0; c < ncols; c += 8) {
        const v8 x = load8(row + c);
        mx = x > mx ? x : mx;
      }
      float bmax = mx[0];
      for (int i = 1; i < 8; ++i) bmax = std::max(bmax, mx[i]);
      mold[r] = m[r0 + r];
      mnew[r] = p < 0 ? NEG_INF : std::max(m[r0 + r], bmax);
    }
    // exp(old max - new max); 0 where nothing was seen before (old -inf); 1 where nothing is seen yet (both -inf)
    const v8 scale = mnew == neg_inf ? splat(1.0f) : exp8(mold - mnew);
    for (int r = 0; r < RG; ++r) {
      float* row = &s[r * BK];
      corr[r] = scale[r];
      if (mnew[r] == NEG_INF) {  // a row past the end, or one that has seen no key yet: adds nothing
        std::fill(row, row + ncols, 0.0f);
        continue;
      }
      const v8 sub = splat(mnew[r]);
      v8 sum = {};
      for (int c = 0; c < ncols; c += 8) {
        const v8 e = exp8(load8(row + c) - sub);
        store8(row + c, e);
        sum += e;
      }
      l[r0 + r] = l[r0 + r] * scale[r] + hsum(sum);
      m[r0 + r] = mnew[r];
    }
  }

  // o[r0 .. r0 + RG] = o * corr + s . v_block: RG rows x 16 dims per pass.
  __attribute__((noinline)) void accumulate(int64_t r0, const float* corr, const float* vb, int64_t vstride, int64_t nk, int64_t d) {
    for (int64_t c0 = 0; c0 < d; c0 += 16) {
      v8 acc[RG][2];
      for (int r = 0; r < RG; ++r) {
        acc[r][0] = load8(&o[(r0 + r) * d + c0]) * corr[r];
        acc[r][1] = c0 + 8 < d ? load8(&o[(r0 + r) * d + c0 + 8]) * corr[r] : v8{};
      }
      if (c0 + 8 < d) {
        for (int64_t j = 0; j < nk; ++j) {
          const v8 x0 = load8(vb + j * vstride + c0), x1 = load8(vb + j * vstride + c0 + 8);
          for (int r = 0; r < RG; ++r) {
            const v8 p = splat(s[r * BK + j]);
            acc[r][0] += p * x0;
            acc[r][1] += p * x1;
          }
        }
      } else {  // d % 16 == 8: the last 8 dims
        for (int64_t j = 0; j < nk; ++j) {
          const v8 x0 = load8(vb + j * vstride + c0);
          for (int r = 0; r < RG; ++r) acc[r][0] += splat(s[r * BK + j]) * x0;
        }
      }
      for (int r = 0; r < RG; ++r) {
        store8(&o[(r0 + r) * d + c0], acc[r][0]);
        if (c0 + 8 < d) store8(&o[(r0 + r) * d + c0 + 8], acc[r][1]);
      }
    }
  }
};

ffi::Error CausalAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> kv_seg,
                           ffi::ResultBuffer<ffi::F32> out, float scale) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  auto sq = q_seg.dimensions(), sk = kv_seg.dimensions(), od = out->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || sq.size() != 2 || sk.size() != 2 || od.size() != 4) {
    return ffi::Error::InvalidArgument("qcjax_causal_attention: expected q, k, v, out [B, T, heads, D], segments [B, T]");
  }
  const Shape z{qd[0], qd[1], qd[2], kd[2], qd[3]};
  bool ok = kd[0] == z.b && kd[1] == z.t && kd[3] == z.d && std::equal(kd.begin(), kd.end(), vd.begin()) &&
            sq[0] == z.b && sq[1] == z.t && sk[0] == z.b && sk[1] == z.t &&
            std::equal(qd.begin(), qd.end(), od.begin()) && z.kv > 0 && z.h % z.kv == 0 && z.d % 8 == 0;
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "qcjax_causal_attention: q [B, T, H, D], k and v [B, T, KV, D] with KV dividing H and D a multiple of 8, "
        "segments [B, T]");
  }
  const int64_t tiles = (z.t + TQ - 1) / TQ;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t *qsp = q_seg.typed_data(), *ksp = kv_seg.typed_data();
  float* op = out->typed_data();
  return qcjax::parallel_for(pool, z.b * z.kv * tiles, "qcjax_causal_attention", [=]() {
    return [=, tile = Tile()](int64_t it) mutable {  // one tile's scratch per thread
      // Last tiles first: they see the most keys, so the threads finish together.
      const int64_t ti = tiles - 1 - it / (z.b * z.kv), rest = it % (z.b * z.kv);
      tile.run(z, qp, kp, vp, qsp, ksp, op, scale, rest / z.kv, rest % z.kv, ti * TQ);
    };
  });
}

// ---- the sampler's decode steps: a few new queries per row against the row's KV cache ----
//
// XLA:CPU ran this as the reference does, over every slot of the cache: the bf16 cache widened and transposed to a
// float32 copy per layer per step, the scores masked and normalised in separate passes (0.5B bf16, a 4096-token
// prompt, cache of 8192 slots: a decode step 58 -> 194 ms). Here each work item is one block of CK keys of one
// (row, KV head): it reads the keys and values once, in the cache's own dtype, for every query head of the group,
// and skips the blocks past the row's last visible position. Each item leaves a partial softmax (max, sum, weighted
// values); the partials of a (row, KV head) are merged at the end.

constexpr int64_t CK = 256;  // keys per work item

inline void widen_row(const float* src, float* dst, int64_t d) { std::memcpy(dst, src, d * sizeof(float)); }
inline void widen_row(const uint16_t* src, float* dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    const uint32_t b = uint32_t(src[i]) << 16;
    std::memcpy(dst + i, &b, sizeof(float));
  }
}

struct CacheShape {
  int64_t b, t, h, s, kv, d;  // batch, queries per row, query heads, cache slots, KV heads, head dim
};

// One work item's scratch: the group's queries (scaled), one key/value row widened, the block's scores.
struct CacheBlock {
  std::vector<float> q, row, sc;

  template <typename T>
  void run(const CacheShape& z, const float* q_in, const T* k_in, const T* v_in, const int32_t* qs,
           const int32_t* ks, const int32_t* q_off, float scale, int64_t b, int64_t kh, int64_t c, float* m_out,
           float* l_out, float* acc_out) {
    const int64_t g = z.h / z.kv, d = z.d, rows = g * z.t, j0 = c * CK;
    const int64_t width = (CK + 7) / 8 * 8;
    const int64_t j1 = std::min<int64_t>({z.s, j0 + CK, int64_t(q_off[b]) + z.t});  // past the row's last query
    std::fill(m_out, m_out + rows, NEG_INF);
    std::fill(l_out, l_out + rows, 0.0f);
    std::fill(acc_out, acc_out + rows * d, 0.0f);
    if (j1 <= j0) return;
    q.resize(rows * d);
    row.resize(d);
    sc.assign(rows * width, NEG_INF);
    for (int64_t i = 0; i < z.t; ++i)  // rows ordered (query, head of the group)
      for (int64_t gi = 0; gi < g; ++gi) {
        const float* src = q_in + ((b * z.t + i) * z.h + kh * g + gi) * d;
        for (int64_t e = 0; e < d; ++e) q[(i * g + gi) * d + e] = src[e] * scale;
      }
    const int32_t* ksb = ks + b * z.s;
    for (int64_t j = j0; j < j1; ++j) {
      widen_row(k_in + ((b * z.s + j) * z.kv + kh) * d, row.data(), d);
      for (int64_t i = 0; i < z.t; ++i) {
        if (j > q_off[b] + i || ksb[j] != qs[b * z.t + i]) continue;  // stays -inf
        for (int64_t gi = 0; gi < g; ++gi) {
          const float* qr = &q[(i * g + gi) * d];
          v8 a = {};
          for (int64_t e = 0; e < d; e += 8) a += load8(qr + e) * load8(row.data() + e);
          sc[(i * g + gi) * width + (j - j0)] = hsum(a);
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {  // scores -> exp(score - block max); the sums
      float* sr = &sc[r * width];
      float mx = NEG_INF;
      for (int64_t j = 0; j < j1 - j0; ++j) mx = std::max(mx, sr[j]);
      m_out[r] = mx;
      if (mx == NEG_INF) continue;  // sees no key of this block
      const v8 sub = splat(mx);
      v8 sum = {};
      for (int64_t j = 0; j < width; j += 8) {
        const v8 e = exp8(load8(sr + j) - sub);
        store8(sr + j, e);
        sum += e;
      }
      l_out[r] = hsum(sum);
    }
    for (int64_t j = j0; j < j1; ++j) {  // the weighted values
      widen_row(v_in + ((b * z.s + j) * z.kv + kh) * d, row.data(), d);
      for (int64_t r = 0; r < rows; ++r) {
        const float p = sc[r * width + (j - j0)];
        if (p == 0.0f) continue;
        float* acc = acc_out + r * d;
        const v8 pv = splat(p);
        for (int64_t e = 0; e < d; e += 8) store8(acc + e, load8(acc + e) + pv * load8(row.data() + e));
      }
    }
  }
};

template <typename T>
ffi::Error cache_attention(ffi::ThreadPool pool, const CacheShape& z, const float* qp, const T* kp, const T* vp,
                           const int32_t* qsp, const int32_t* ksp, const int32_t* offp, float* op, float scale) {
  const int64_t g = z.h / z.kv, rows = g * z.t, blocks = (z.s + CK - 1) / CK, items = z.b * z.kv * blocks;
  std::vector<float> m(items * rows), l(items * rows), acc(items * rows * z.d);
  float *mp = m.data(), *lp = l.data(), *ap = acc.data();
  auto make = [=]() {
    return [=, blk = CacheBlock()](int64_t it) mutable {
      const int64_t c = it % blocks, bk = it / blocks;
      blk.run(z, qp, kp, vp, qsp, ksp, offp, scale, bk / z.kv, bk % z.kv, c, mp + it * rows, lp + it * rows,
              ap + it * rows * z.d);
    };
  };
  // Below ~2M multiply-adds (a short cache) the calling thread does it all: less work than waking a helper. (Not
  // shown to matter: 0.5B fp32 at 64 slots decoded at 0.96x XLA's attention both with and without this.)
  int64_t seen = 0;
  for (int64_t b = 0; b < z.b; ++b) seen = std::max<int64_t>(seen, std::min<int64_t>(z.s, int64_t(offp[b]) + z.t));
  if (2 * z.b * z.kv * seen * rows * z.d < (int64_t(1) << 21)) {
    auto work = make();
    for (int64_t it = 0; it < items; ++it) work(it);
  } else {
    auto err = qcjax::parallel_for(pool, items, "qcjax_cache_attention", make);
    if (err.failure()) return err;
  }
  for (int64_t bk = 0; bk < z.b * z.kv; ++bk) {  // merge each (row, KV head)'s blocks
    const int64_t b = bk / z.kv, kh = bk % z.kv;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = r / g, gi = r % g;
      float* o = op + ((b * z.t + i) * z.h + kh * g + gi) * z.d;
      float mx = NEG_INF;
      for (int64_t c = 0; c < blocks; ++c) mx = std::max(mx, mp[(bk * blocks + c) * rows + r]);
      std::fill(o, o + z.d, 0.0f);
      if (mx == NEG_INF) continue;  // a query that sees no key: zeros
      float sum = 0.0f;
      for (int64_t c = 0; c < blocks; ++c) {
        const int64_t it = bk * blocks + c;
        const float mc = mp[it * rows + r];
        if (mc == NEG_INF) continue;
        const float w = std::exp(mc - mx);
        sum += lp[it * rows + r] * w;
        const float* a = ap + (it * rows + r) * z.d;
        for (int64_t e = 0; e < z.d; ++e) o[e] += w * a[e];
      }
      for (int64_t e = 0; e < z.d; ++e) o[e] /= sum;
    }
  }
  return ffi::Error::Success();
}

ffi::Error CacheAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> kv_seg, ffi::Buffer<ffi::S32> q_offset,
                          ffi::ResultBuffer<ffi::F32> out, float scale) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), od = out->dimensions();
  auto sq = q_seg.dimensions(), sk = kv_seg.dimensions(), so = q_offset.dimensions();
  bool ok = qd.size() == 4 && kd.size() == 4 && vd.size() == 4 && od.size() == 4 && sq.size() == 2 &&
            sk.size() == 2 && so.size() == 1 && k.element_type() == v.element_type() &&
            (k.element_type() == ffi::F32 || k.element_type() == ffi::BF16);
  const CacheShape z = ok ? CacheShape{qd[0], qd[1], qd[2], kd[1], kd[2], qd[3]} : CacheShape{};
  ok = ok && kd[0] == z.b && kd[3] == z.d && std::equal(kd.begin(), kd.end(), vd.begin()) && sq[0] == z.b &&
       sq[1] == z.t && sk[0] == z.b && sk[1] == z.s && so[0] == z.b && std::equal(qd.begin(), qd.end(), od.begin()) &&
       z.kv > 0 && z.h % z.kv == 0 && z.d % 8 == 0;
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "qcjax_cache_attention: q, out [B, T, H, D] float32; k, v [B, S, KV, D] both float32 or both bfloat16 with "
        "KV dividing H and D a multiple of 8; q segments [B, T], kv segments [B, S], q_offset [B] int32");
  }
  try {  // nothing may unwind into XLA (the partials' allocation)
    const float* qp = q.typed_data();
    const int32_t *qsp = q_seg.typed_data(), *ksp = kv_seg.typed_data(), *offp = q_offset.typed_data();
    if (k.element_type() == ffi::F32)
      return cache_attention(pool, z, qp, static_cast<const float*>(k.untyped_data()),
                             static_cast<const float*>(v.untyped_data()), qsp, ksp, offp, out->typed_data(), scale);
    return cache_attention(pool, z, qp, static_cast<const uint16_t*>(k.untyped_data()),
                           static_cast<const uint16_t*>(v.untyped_data()), qsp, ksp, offp, out->typed_data(), scale);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("qcjax_cache_attention: ") + e.what());
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QcjaxCausalAttention, CausalAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QcjaxCacheAttention, CacheAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
