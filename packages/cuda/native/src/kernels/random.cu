// Philox 4x32-10 random numbers (see random.h), bit-identical with @megapatch/tensor's CPU
// backend (native/src/random.cc) for every dtype: the same words, the same conversions to
// doubles (fused multiply-adds where the CPU's -march=native build fuses them: `a + (b - a) * u`
// and `a + b * rad * cos(th)`), rounded to the output dtype the same way. The device's double
// log/sqrt/cos/sin may differ from glibc's by an ulp, which shows only in float64 normals (and,
// once in ~2^29 draws, in a float32 one).
//
// One thread per block of four elements, grid-stride; the distribution is a template parameter.
#include <cmath>

#include "random.h"

namespace mpc {
namespace {

struct U4 {
  uint32_t v[4];
};

MP_HD U4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int r = 0; r < 10; r++) {
    uint64_t p0 = static_cast<uint64_t>(M0) * c0, p1 = static_cast<uint64_t>(M1) * c2;
    uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    uint32_t n1 = static_cast<uint32_t>(p1);
    uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    uint32_t n3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += W0;
    k1 += W1;
  }
  U4 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// (0, 1): never 0, so log() in Box-Muller stays finite.
MP_D double u01(uint32_t x) { return (static_cast<double>(x) + 0.5) * (1.0 / 4294967296.0); }

// [0, 1) with as many random bits as the storage type has significand bits (32 for float64 and
// the integer outputs), so u is exact in T and never rounds up to 1 when stored.
template <typename T> struct UniformBits { static constexpr int value = 32; };
template <> struct UniformBits<float> { static constexpr int value = 24; };
template <> struct UniformBits<bf16> { static constexpr int value = 8; };
template <> struct UniformBits<f16> { static constexpr int value = 11; };

template <typename T> MP_D double u01_exact(uint32_t x) {
  constexpr int bits = UniformBits<T>::value;
  return static_cast<double>(x >> (32 - bits)) * (1.0 / static_cast<double>(uint64_t{1} << bits));
}

template <typename T, int DIST>
__global__ void philox_kernel(T* out, int64_t n, uint32_t k0, uint32_t k1, uint64_t offset, double a, double b) {
  using C = typename Tr<T>::C;
  const int64_t blocks = (n + 3) / 4;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < blocks;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t ctr = offset + static_cast<uint64_t>(j);
    const U4 r = philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0, 0, k0, k1);
    double v[4];
    if constexpr (DIST == kDistUniform) {
      for (int l = 0; l < 4; l++) v[l] = fma(b - a, u01_exact<T>(r.v[l]), a);
    } else if constexpr (DIST == kDistNormal) {
      for (int l = 0; l < 4; l += 2) {
        const double rad = sqrt(-2.0 * log(u01(r.v[l])));
        const double th = 6.283185307179586 * u01(r.v[l + 1]);
        const double br = b * rad;
        v[l] = fma(br, cos(th), a);
        v[l + 1] = fma(br, sin(th), a);
      }
    } else if constexpr (DIST == kDistRandint) {  // [a, b)
      const double span = b - a;
      for (int l = 0; l < 4; l++) v[l] = a + floor(u01(r.v[l]) * span);
    } else {  // bernoulli(p = a)
      for (int l = 0; l < 4; l++) v[l] = u01(r.v[l]) < a ? 1.0 : 0.0;
    }
    const int64_t i0 = 4 * j;
    if (i0 + 4 <= n) {
      for (int l = 0; l < 4; l++) Tr<T>::st(out + i0 + l, static_cast<C>(v[l]));
    } else {
      for (int l = 0; l < 4 && i0 + l < n; l++) Tr<T>::st(out + i0 + l, static_cast<C>(v[l]));
    }
  }
}

template <typename T>
void philox_t(cudaStream_t s, const TensorArg& out, int dist, uint32_t k0, uint32_t k1, uint64_t offset, double a,
              double b) {
  const int64_t n = out.numel();
  const int64_t blocks = (n + 3) / 4;
  T* o = out.ptr<T>();
  const unsigned grid = grid_for(blocks);
  switch (dist) {
    case kDistUniform: {
      auto k = philox_kernel<T, kDistUniform>;
      MP_LAUNCH(k, grid, kThreads, 0, s, o, n, k0, k1, offset, a, b);
      break;
    }
    case kDistNormal: {
      auto k = philox_kernel<T, kDistNormal>;
      MP_LAUNCH(k, grid, kThreads, 0, s, o, n, k0, k1, offset, a, b);
      break;
    }
    case kDistRandint: {
      auto k = philox_kernel<T, kDistRandint>;
      MP_LAUNCH(k, grid, kThreads, 0, s, o, n, k0, k1, offset, a, b);
      break;
    }
    default: {  // bernoulli, as the CPU treats every other code
      auto k = philox_kernel<T, kDistBernoulli>;
      MP_LAUNCH(k, grid, kThreads, 0, s, o, n, k0, k1, offset, a, b);
      break;
    }
  }
  check_launch("philox");
}

}  // namespace

void philox(cudaStream_t s, const TensorArg& out, int dist, uint32_t k0, uint32_t k1, uint64_t offset, double a,
            double b) {
  if (!out.contiguous()) throw_error("philox: output must be contiguous");
  if (out.numel() == 0) return;
  MPC_DISPATCH_ALL(out.dtype, philox_t, s, out, dist, k0, k1, offset, a, b);
}

void philox_block(const uint32_t c[4], uint32_t k0, uint32_t k1, uint32_t out[4]) {
  U4 r = philox4x32_10(c[0], c[1], c[2], c[3], k0, k1);
  for (int i = 0; i < 4; i++) out[i] = r.v[i];
}

}  // namespace mpc
