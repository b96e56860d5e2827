// Vector helpers shared by the native kernels (csrc/vocab_pass.cpp, csrc/distill_pass.cpp).
//
// GCC/Clang vector extensions rather than intrinsics, so the same source compiles to AVX-512, AVX2
// or NEON depending on -march; exp and log are our own (range reduction + polynomial) because
// libm's expf/logf do not vectorize and ATen's vectorized ones need Sleef at build time. Both are
// built for IEEE semantics (no -ffast-math): the exp rounds with the 1.5·2^23 trick, and NaN must
// stay NaN through every helper so that a NaN input is never hidden.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace afrl_simd {

// Lanes per vector: one native register. A wider generic vector is split by GCC, and its
// compare-and-select (a > b ? a : b) then falls back to per-lane scalar code (measured on AVX2 with
// 16 lanes: vucomiss and a branch per lane in the max pass, ~18x the memory floor).
#if defined(__AVX512F__)
constexpr int kW = 16;  // one zmm
#elif defined(__AVX__)
constexpr int kW = 8;   // one ymm
#else
constexpr int kW = 4;   // one xmm / NEON q register
#endif
// Floats per tile: 128 per lane, i.e. two accumulator sets of ≤ 64 fp32 terms per lane, and at most
// 8 KB, which stays in L1 between a tile's max pass and its exp pass.
constexpr int64_t kTile = 128 * kW;

typedef float vf __attribute__((vector_size(kW * 4)));
typedef int32_t vi __attribute__((vector_size(kW * 4)));
typedef uint32_t vu __attribute__((vector_size(kW * 4)));
typedef uint16_t vh __attribute__((vector_size(kW * 2)));

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// exp(d) for d < -88 is below FLT_MIN; flushing to 0 there costs < 1e-38 absolute and avoids
// denormals (slow) and NaN from -inf logits (0 · -inf).
constexpr float kExpFloor = -88.0f;

inline vf splat(float x) { return vf{} + x; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
// max(d, floor) that keeps NaN (one maxps, operands swapped): clamping NaN to the floor would turn
// a NaN logit into a zero probability and hide it.
inline vf floor_keep_nan(vf d, vf floor) { return floor > d ? floor : d; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }

// exp for x in [-88, 0] (callers clamp). x = n·ln2 + r with |r| ≤ ln2/2, exp(r) ≈ 1 + r + r²·q(r),
// q a degree-4 least-squares fit on Chebyshev nodes (relative error 4e-9 before fp32 rounding,
// so ≈ 1-2 ulp overall). 2^n is built in the exponent bits; n = -127 gives exactly 0.
inline vf exp_nonpos(vf x) {
  const vf magic = splat(12582912.0f);  // 1.5·2^23: adding it rounds to an integer (no fast-math)
  const vf t = x * 1.44269504088896341f + magic;
  const vf n = t - magic;
  const vi ni = (vi)t - (vi)magic;
  // Cody-Waite: ln2_hi has 16 significant bits, so n·ln2_hi is exact for |n| ≤ 255.
  vf r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  vf q = splat(0.0013751407386735082f);
  q = q * r + 0.008368915878236294f;
  q = q * r + 0.04166953265666962f;
  q = q * r + 0.166665181517601f;
  q = q * r + 0.49999988079071045f;
  const vf p = 1.0f + (r + (r * r) * q);
  const vf two_n = (vf)((ni + 127) << 23);
  return p * two_n;
}

// ---- loads and stores of fp32 / bf16 rows as fp32 vectors --------------------------------------

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}
inline vf load(const c10::BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);  // bf16 is the top half of an fp32
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void store(c10::BFloat16* p, vf v) {
  // round to nearest even, as c10::BFloat16(float) does for finite values
  vu b = (vu)v;
  b = b + 0x7FFFu + ((b >> 16) & 1u);
  const vh h = __builtin_convertvector(b >> 16, vh);
  std::memcpy(p, &h, sizeof h);
}
// Tails shorter than a vector go through a float buffer padded with `fill`.
template <typename T>
inline vf load_tail(const T* p, int64_t n, float fill) {
  alignas(64) float buf[kW];
  for (int i = 0; i < kW; ++i) buf[i] = i < n ? static_cast<float>(p[i]) : fill;
  return load(buf);
}
template <typename T>
inline void store_tail(T* p, int64_t n, vf v) {
  alignas(64) float buf[kW];
  store(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
}

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kW; ++i) m = std::max(m, v[i]);
  return m;
}
inline double hsum(vf v) {
  double s = 0.0;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
}

// log for x > 0 normal or +inf, NaN kept (callers keep 0 and denormals away). x = 2^e·m with
// m in [√½, √2), so with s = (m − 1)/(m + 1), |s| ≤ 0.1716: log m = 2·atanh(s) = 2s + s³·R(s²),
// R a degree-2 least-squares fit on Chebyshev nodes (relative error 8e-10 before fp32 rounding,
// ≈ 1-2 ulp overall). e·ln2 is added in two parts (ln2_hi exact in 16 bits) so log near 1 keeps
// its relative accuracy.
inline vf log_pos(vf x) {
  const vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xff) - 127;
  vf m = (vf)((bits & 0x7fffff) | 0x3f800000);  // [1, 2)
  const vi big = m > 1.41421356237f;             // -1 where m > √2: halve m, bump e
  m = big ? m * 0.5f : m;
  e = e - big;
  const vf s = (m - 1.0f) / (m + 1.0f);
  const vf w = s * s;
  vf r = splat(0.298753023147583f);
  r = r * w + 0.3997737765312195f;
  r = r * w + 0.6666677594184875f;
  const vf ef = __builtin_convertvector(e, vf);
  const vf lm = 2.0f * s + (s * w) * r;
  const vf y = ef * 0.693145751953125f + (lm + ef * 1.428606765330187e-06f);
  const vf inf = splat(std::numeric_limits<float>::infinity());
  return x == x ? (x == inf ? inf : y) : x;  // NaN in, NaN out; +inf in, +inf out
}

}  // namespace afrl_simd
