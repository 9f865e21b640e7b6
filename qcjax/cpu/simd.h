// The vector types and loads the few-row matmul kernels share (matmul.cc: the tied head; stacked.cc: the layer loop).
//
// One vector register's worth of lanes: 16 floats on AVX-512 (32 registers), 8 on AVX2 and below (16 registers), so
// the 8-row loops' accumulators stay in registers (64-byte vectors on AVX2 took two registers each and spilled: 8 rows
// read 3 GB/s instead of 9-20 on a Zen 3 host).
#pragma once

#include <cstdint>
#include <cstring>

namespace qcjax_simd {

#ifdef __AVX512F__
constexpr int L = 16;
#else
constexpr int L = 8;
#endif
typedef float f32v __attribute__((vector_size(4 * L)));
typedef uint16_t u16v __attribute__((vector_size(2 * L)));
typedef uint32_t u32v __attribute__((vector_size(4 * L)));
typedef int8_t i8v __attribute__((vector_size(L)));

// L elements at p as float32: float as is, bfloat16 bits shifted into the high half, int8 exactly.
inline f32v widen(const float* p) {
  f32v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline f32v widen(const uint16_t* p) {
  u16v h;
  std::memcpy(&h, p, sizeof(h));
  u32v w = __builtin_convertvector(h, u32v) << 16;
  f32v v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

inline f32v widen(const int8_t* p) {
  i8v h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, f32v);
}

// One element as float32, the same conversions.
inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) {
  uint32_t b = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}
inline float scalar(int8_t v) { return float(v); }

}  // namespace qcjax_simd
