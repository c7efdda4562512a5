// Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a
// counter-based generator, so element i of a draw depends only on (seed, offset, i) and every
// backend produces the same stream. Block j of a draw uses counter (offset + j, 0, 0, 0) under
// key (seed_lo, seed_hi) and yields four 32-bit words for elements 4j..4j+3.
#include "common.h"

namespace mp {

struct U4 { uint32_t v[4]; };

static inline U4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int r = 0; r < 10; r++) {
    uint64_t p0 = static_cast<uint64_t>(M0) * c0, p1 = static_cast<uint64_t>(M1) * c2;
    uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    uint32_t n1 = static_cast<uint32_t>(p1);
    uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    uint32_t n3 = static_cast<uint32_t>(p0);
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += W0;
    k1 += W1;
  }
  return U4{{c0, c1, c2, c3}};
}

// (0, 1): never 0, so log() in Box-Muller stays finite.
static inline double u01(uint32_t x) { return (static_cast<double>(x) + 0.5) * (1.0 / 4294967296.0); }

// [0, 1) with as many random bits as the storage type has significand bits (as torch does), so
// that u is exact in T and never rounds up to 1 when stored; u01 above would round to 1.0 in
// bfloat16 once in ~500 draws and in float32 once in ~3e7.
template <typename T> constexpr int uniform_bits() { return 32; }  // double (and integer outputs)
template <> constexpr int uniform_bits<float>() { return 24; }
template <> constexpr int uniform_bits<bf16>() { return 8; }
template <> constexpr int uniform_bits<f16>() { return 11; }
template <typename T>
static inline double u01_exact(uint32_t x) {
  constexpr int bits = uniform_bits<T>();
  return static_cast<double>(x >> (32 - bits)) * (1.0 / static_cast<double>(uint64_t{1} << bits));
}

enum Dist : int { kUniform = 0, kNormal = 1, kRandint = 2, kBernoulli = 3 };

template <typename T>
static void philox_run(const TensorArg& out, int dist, uint32_t k0, uint32_t k1, uint64_t offset, double a, double b) {
  int64_t n = out.numel();
  int64_t blocks = (n + 3) / 4;
  T* o = out.ptr<T>();
  parallel_for(blocks, 16, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; j++) {
      uint64_t ctr = offset + static_cast<uint64_t>(j);
      U4 r = philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0, 0, k0, k1);
      double v[4];
      switch (dist) {
        case kUniform:
          for (int l = 0; l < 4; l++) v[l] = a + (b - a) * u01_exact<T>(r.v[l]);
          break;
        case kNormal:
          for (int l = 0; l < 4; l += 2) {
            double rad = std::sqrt(-2.0 * std::log(u01(r.v[l])));
            double th = 6.283185307179586 * u01(r.v[l + 1]);
            v[l] = a + b * rad * std::cos(th);
            v[l + 1] = a + b * rad * std::sin(th);
          }
          break;
        case kRandint: {  // [a, b)
          double span = b - a;
          for (int l = 0; l < 4; l++) v[l] = a + std::floor(u01(r.v[l]) * span);
          break;
        }
        default:  // bernoulli(p = a): 1 with probability a
          for (int l = 0; l < 4; l++) v[l] = u01(r.v[l]) < a ? 1.0 : 0.0;
      }
      for (int l = 0; l < 4; l++) {
        int64_t i = 4 * j + l;
        if (i < n) Tr<T>::st(o + i, static_cast<typename Tr<T>::C>(v[l]));
      }
    }
  });
}

// philox(out contiguous, dist, seedLo, seedHi, offset, a, b); the caller advances its offset by
// ceil(numel / 4).
MP_ENTRY(PhiloxK) {
  Args a;
  TensorArg out = a.tensor();
  int dist = a.i32();
  uint32_t k0 = static_cast<uint32_t>(a.num()), k1 = static_cast<uint32_t>(a.num());
  uint64_t offset = static_cast<uint64_t>(a.num());
  double lo = a.num(), hi = a.num();
  if (!out.contiguous()) throw_error("philox: output must be contiguous");
  MP_DISPATCH_ALL(out.dtype, philox_run, out, dist, k0, k1, offset, lo, hi);
  return info.Env().Undefined();
}

// philoxBlock(c0, c1, c2, c3, k0, k1) -> [4 words]: for tests against the published
// known-answer vectors.
static Napi::Value PhiloxBlock(const Napi::CallbackInfo& info) {
  uint32_t w[6];
  for (int i = 0; i < 6; i++) w[i] = info[i].As<Napi::Number>().Uint32Value();
  U4 r = philox4x32_10(w[0], w[1], w[2], w[3], w[4], w[5]);
  Napi::Array arr = Napi::Array::New(info.Env(), 4);
  for (uint32_t i = 0; i < 4; i++) arr.Set(i, Napi::Number::New(info.Env(), r.v[i]));
  return arr;
}

void register_random(Napi::Env env, Napi::Object exports) {
  exports.Set("philox", Napi::Function::New(env, PhiloxK));
  exports.Set("philoxBlock", Napi::Function::New(env, PhiloxBlock));
}

}  // namespace mp
