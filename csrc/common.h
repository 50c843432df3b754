// Shared definitions for the CPU and CUDA kernels of freezert._C.
//
// Every numeric conversion lives here as a __host__ __device__ function so the CPU and
// CUDA paths produce bit-identical results by construction (one implementation, tested
// against torch's conversions on the CPU).
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>

#if defined(__CUDACC__)
#define FRZ_HD __host__ __device__ __forceinline__
#else
#define FRZ_HD inline
#endif

namespace freezert {

// Bump when a binding's signature or meaning changes; _native.py refuses a stale module.
constexpr int kAbiVersion = 1;

// Element types crossing the boundary (must match _native.py's _ELEM codes).
enum Elem : int { kF32 = 0, kF16 = 1, kBF16 = 2, kFP8 = 3 /* uint8 holding e4m3fn bits */ };

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

FRZ_HD uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Word i of a row: the contribution summed (mod 2^64) into the row hash.
FRZ_HD uint64_t hash_word(uint64_t w, uint64_t i) { return splitmix64(w ^ (i * kGolden)); }

FRZ_HD uint64_t hash_finish(uint64_t h, uint64_t row_bytes, uint64_t seed) {
  return splitmix64(h ^ splitmix64(row_bytes ^ seed));
}

FRZ_HD uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
FRZ_HD float f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// ---- float16 -------------------------------------------------------------------------
// Round-to-nearest-even; overflow -> inf; NaN -> sign | 0x7E00 (torch's scalar path).
FRZ_HD uint16_t f16_from_f32(float f) {
  const uint32_t x = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return sign | 0x7E00u;          // NaN
  if (ax >= 0x477FF000u) return sign | 0x7C00u;         // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                               // below 2^-14: half subnormal / zero
    if (ax < 0x33000000u) return sign;                  // below 2^-25 rounds to zero
    const uint32_t e = ax >> 23;                        // 102..112
    const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - e;                    // 14..24 (units of 2^-24)
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t r = (ax - 0x38000000u) >> 13;                // rebias exponent 127 -> 15
  const uint32_t rem = ax & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return sign | static_cast<uint16_t>(r);
}

FRZ_HD float f32_from_f16(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  const uint32_t m = h & 0x3FFu;
  if (e == 0) {  // zero / subnormal: m * 2^-24, exact in float
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;
    return f32_from_bits(f32_bits(v) | sign);
  }
  if (e == 31) return f32_from_bits(sign | 0x7F800000u | (m << 13));
  return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
}

// ---- bfloat16 ------------------------------------------------------------------------
// Round-to-nearest-even; NaN -> 0x7FC0 (torch's scalar c10::BFloat16 path).
FRZ_HD uint16_t bf16_from_f32(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  const uint32_t bias = ((x >> 16) & 1u) + 0x7FFFu;
  return static_cast<uint16_t>((x + bias) >> 16);
}
FRZ_HD float f32_from_bf16(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }

// ---- float8 e4m3fn -------------------------------------------------------------------
constexpr float kFP8Max = 448.0f;

// Saturating round-to-nearest-even: |f| is clamped to 448 first (torch's .to() does not
// saturate; the Python reference clamps too). NaN -> sign | 0x7F.
FRZ_HD uint8_t fp8_from_f32(float f) {
  const uint32_t x = f32_bits(f);
  const uint8_t sign = static_cast<uint8_t>((x >> 24) & 0x80u);
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return sign | 0x7Fu;            // NaN
  if (ax >= 0x43E00000u) return sign | 0x7Eu;           // >= 448 (incl. inf): saturate
  if (ax < 0x3C800000u) {                               // below 2^-6: subnormal / zero
    if (ax < 0x3A000000u) return sign;                  // at most 2^-11: rounds to zero
    const uint32_t e = ax >> 23;                        // 116..120
    const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 141u - e;                    // units of 2^-9: 21..25
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | static_cast<uint8_t>(r);
  }
  uint32_t r = (ax - 0x3C000000u) >> 20;                // rebias exponent 127 -> 7
  const uint32_t rem = ax & 0xFFFFFu;
  if (rem > 0x80000u || (rem == 0x80000u && (r & 1u))) ++r;
  if (r > 0x7Eu) r = 0x7Eu;                             // cannot happen below 448; keep finite
  return sign | static_cast<uint8_t>(r);
}

FRZ_HD float f32_from_fp8(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t e = (b >> 3) & 0xFu;
  const uint32_t m = b & 0x7u;
  if (e == 15 && m == 7) return f32_from_bits(sign | 0x7FC00000u);  // NaN
  if (e == 0) {  // m * 2^-9, exact
    const float v = static_cast<float>(m) * 0.001953125f;
    return f32_from_bits(f32_bits(v) | sign);
  }
  return f32_from_bits(sign | ((e + 120u) << 23) | (m << 20));
}

// ---- element load / store ------------------------------------------------------------
template <int E> struct ElemT;
template <> struct ElemT<kF32> { using T = float; };
template <> struct ElemT<kF16> { using T = uint16_t; };
template <> struct ElemT<kBF16> { using T = uint16_t; };
template <> struct ElemT<kFP8> { using T = uint8_t; };

template <int E> FRZ_HD float load_f32(typename ElemT<E>::T v);
template <> FRZ_HD float load_f32<kF32>(float v) { return v; }
template <> FRZ_HD float load_f32<kF16>(uint16_t v) { return f32_from_f16(v); }
template <> FRZ_HD float load_f32<kBF16>(uint16_t v) { return f32_from_bf16(v); }
template <> FRZ_HD float load_f32<kFP8>(uint8_t v) { return f32_from_fp8(v); }

template <int E> FRZ_HD typename ElemT<E>::T store_from_f32(float v);
template <> FRZ_HD float store_from_f32<kF32>(float v) { return v; }
template <> FRZ_HD uint16_t store_from_f32<kF16>(float v) { return f16_from_f32(v); }
template <> FRZ_HD uint16_t store_from_f32<kBF16>(float v) { return bf16_from_f32(v); }
template <> FRZ_HD uint8_t store_from_f32<kFP8>(float v) { return fp8_from_f32(v); }

// Per-row fp8 scale from the row's amax (float32 arithmetic, as in the reference); an
// all-zero row gets scale 1, a NaN amax stays NaN.
FRZ_HD float fp8_scale(float amax) { return amax == 0.0f ? 1.0f : amax / kFP8Max; }

// Dispatch an (int) element code to a template parameter.
#define FRZ_DISPATCH_ELEM(code, NAME, ...)                       \
  switch (code) {                                                \
    case ::freezert::kF32: { constexpr int NAME = ::freezert::kF32; __VA_ARGS__; break; }   \
    case ::freezert::kF16: { constexpr int NAME = ::freezert::kF16; __VA_ARGS__; break; }   \
    case ::freezert::kBF16: { constexpr int NAME = ::freezert::kBF16; __VA_ARGS__; break; } \
    case ::freezert::kFP8: { constexpr int NAME = ::freezert::kFP8; __VA_ARGS__; break; }   \
    default: throw std::invalid_argument("freezert._C: unknown element code");              \
  }

}  // namespace freezert
