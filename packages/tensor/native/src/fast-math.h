// Vectorisable float helpers shared by the kernel families that need a fast exp (softmax,
// cross-entropy, attention).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace mp {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// exp(x) for x <= 0, which is all softmax needs once the row maximum is subtracted, written so
// that GCC vectorises it (std::exp is a libm call and keeps the loop scalar). x = k ln2 + r
// with |r| <= ln2 / 2; exp(r) by its degree-7 Taylor polynomial, whose truncation error there
// (< 1e-8 relative) is below float precision; 2^k goes straight into the exponent bits.
// Results below the smallest normal float flush to 0, so -inf gives exactly 0; NaN stays NaN.
// The special cases are bit masks rather than ?: on floats: under the default -ftrapping-math
// GCC will not if-convert float selects that guard arithmetic, and the loop would stay scalar.
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // few mantissa bits, so k * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kMin = -87.0f;          // k >= -126 keeps 2^k a normal float
  constexpr float kRound = 12582912.0f;   // 1.5 * 2^23: adding it rounds to an integer
  const uint32_t low = 0u - static_cast<uint32_t>(x < kMin);
  const uint32_t nan = 0u - static_cast<uint32_t>(x != x);
  // clamped, and NaN replaced, so that the float-to-int conversion below stays in range
  const float xc = float_of((bits_of(x) & ~(low | nan)) | (bits_of(kMin) & low));
  const float k = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = float_of(static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23);
  const uint32_t res = bits_of(p * scale) & ~low;
  return float_of((res & ~nan) | (bits_of(x) & nan));
}
inline double exp_nonpos(double x) { return std::exp(x); }

// Logistic function: with e = exp(-|x|) (always in (0, 1]), sigmoid is 1/(1+e) for x >= 0 and
// e/(1+e) below, and 1 - sigmoid is the other one, so neither side cancels.
struct SigmoidParts {
  float s, one_minus_s;
};
__attribute__((always_inline)) inline SigmoidParts sigmoid_parts(float x) {
  const float e = exp_nonpos(-std::fabs(x));
  const float r = 1.0f / (1.0f + e);
  const float er = e * r;
  return x >= 0.0f ? SigmoidParts{r, er} : SigmoidParts{er, r};
}
inline float fast_sigmoid(float x) { return sigmoid_parts(x).s; }
inline double fast_sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline float fast_silu(float x) { return x * sigmoid_parts(x).s; }
inline double fast_silu(double x) { return x / (1.0 + std::exp(-x)); }
// d silu / dx = s * (1 + x (1 - s))
inline float fast_silu_grad(float x) {
  const SigmoidParts p = sigmoid_parts(x);
  return p.s * (1.0f + x * p.one_minus_s);
}
inline double fast_silu_grad(double x) {
  const double s = 1.0 / (1.0 + std::exp(-x));
  return s * (1.0 + x * (1.0 - s));
}

}  // namespace mp
