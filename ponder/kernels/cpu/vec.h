// 16-lane float vectors (GCC/Clang vector extensions: AVX-512 where the CPU has it, split into
// narrower registers otherwise) with loads/stores from float, bf16 and fp16, and the reductions
// and exp the kernels need.
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace ponder {

constexpr int kWidth = 16;
typedef float vfloat __attribute__((vector_size(kWidth * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kWidth * sizeof(int32_t))));
typedef uint32_t vuint __attribute__((vector_size(kWidth * sizeof(uint32_t))));
typedef uint16_t vushort __attribute__((vector_size(kWidth * sizeof(uint16_t))));
typedef float vfloat8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vfloat4 __attribute__((vector_size(4 * sizeof(float))));

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vfloat bits_to_float(vuint bits) {
  vfloat v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline vfloat load(const at::BFloat16* p) {
  vushort raw;
  std::memcpy(&raw, p, sizeof(raw));
  return bits_to_float(__builtin_convertvector(raw, vuint) << 16);  // bf16 = top half of fp32
}

// fp32 -> bf16 bits, round to nearest even (NaN stays NaN), as torch converts.
inline vuint bf16_bits(vfloat v) {
  vuint bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const vuint rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return v != v ? vuint{} + 0x7FC0u : rounded;
}

inline vfloat load(const at::Half* p) {
  float tmp[kWidth];
  for (int i = 0; i < kWidth; ++i) tmp[i] = static_cast<float>(p[i]);
  return load(tmp);
}

inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

inline void store(at::BFloat16* p, vfloat v) {
  const vushort raw = __builtin_convertvector(bf16_bits(v), vushort);
  std::memcpy(p, &raw, sizeof(raw));
}

inline void store(at::Half* p, vfloat v) {
  for (int i = 0; i < kWidth; ++i) p[i] = static_cast<at::Half>(v[i]);
}

// Round through T and back: what an eager torch op in dtype T would have stored.
template <typename T>
inline vfloat round_through(vfloat v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    return bits_to_float(bf16_bits(v) << 16);
  } else {
    T tmp[kWidth];
    store(tmp, v);
    return load(tmp);
  }
}

inline float hsum(vfloat v) {  // halving tree: 16 -> 8 -> 4 lanes, then scalars
  vfloat8 lo8, hi8;
  std::memcpy(&lo8, &v, sizeof(lo8));
  std::memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof(lo8), sizeof(hi8));
  const vfloat8 s8 = lo8 + hi8;
  vfloat4 lo4, hi4;
  std::memcpy(&lo4, &s8, sizeof(lo4));
  std::memcpy(&hi4, reinterpret_cast<const char*>(&s8) + sizeof(lo4), sizeof(hi4));
  const vfloat4 s4 = lo4 + hi4;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

inline float hmax(vfloat v) {
  vfloat8 lo8, hi8;
  std::memcpy(&lo8, &v, sizeof(lo8));
  std::memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof(lo8), sizeof(hi8));
  const vfloat8 m8 = lo8 > hi8 ? lo8 : hi8;
  float best = m8[0];
  for (int i = 1; i < 8; ++i) best = best > m8[i] ? best : m8[i];
  return best;
}

// exp on 16 lanes at once (Cephes' expf: range reduction by ln 2, degree-5 polynomial, exponent
// bits set directly); relative error ~1e-7, and exactly 0 below -87 so masked lanes vanish.
inline vfloat vexp(vfloat x) {
  const vint underflow = x < -87.f;
  x = x < -87.f ? vfloat{} - 87.f : x;
  x = x > 88.f ? vfloat{} + 88.f : x;
  const vfloat fx = x * 1.44269504088896341f + 0.5f;
  vint n = __builtin_convertvector(fx, vint);
  n += __builtin_convertvector(n, vfloat) > fx;  // truncation rounded a negative up: floor it
  const vfloat nf = __builtin_convertvector(n, vfloat);
  x = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  const vfloat z = x * x;
  vfloat y = vfloat{} + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.f;
  const vint bits = (n + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? vfloat{} : y * scale;
}

}  // namespace ponder
