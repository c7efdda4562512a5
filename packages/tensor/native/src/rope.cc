// Rotary position embedding in the "rotate half" layout (HF Llama): for the first R channels,
// y = x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x[R/2:], x[:R/2]); channels from R
// on pass through (partial rotary). The backward is the transpose of that linear map, which for
// the HF cos/sin layout is the rotation by the opposite angle; it is written for arbitrary cos/sin
// so it stays exact even when the two halves of cos/sin differ.
#include <type_traits>

#include "common.h"

namespace mp {

namespace {

// double when either operand is float64, float otherwise (16-bit floats compute in fp32).
template <typename TX, typename TC>
using RopeCompute =
    typename std::conditional<std::is_same<TX, double>::value || std::is_same<TC, double>::value, double, float>::type;

// out [B, H, S, D] contiguous; x [B, H, S, D] any strides; cos/sin [B, S, R] (batch stride 0 when
// shared). inverse = apply the transpose (the gradient w.r.t. x).
template <typename TX, typename TC>
void rope_run(const TensorArg& out, const TensorArg& x, const TensorArg& cs, const TensorArg& sn, bool inverse) {
  using C = RopeCompute<TX, TC>;
  const int64_t B = x.shape[0], H = x.shape[1], S = x.shape[2], D = x.shape[3];
  const int64_t R = cs.shape[2], half = R / 2;
  const int64_t rows = B * H * S;
  parallel_for(rows, D * 4, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; row++) {
      const int64_t s = row % S, h = (row / S) % H, b = row / (S * H);
      const TX* xr = x.ptr<TX>() + b * x.strides[0] + h * x.strides[1] + s * x.strides[2];
      TX* o = out.ptr<TX>() + b * out.strides[0] + h * out.strides[1] + s * out.strides[2];
      const TC* c = cs.ptr<TC>() + b * cs.strides[0] + s * cs.strides[1];
      const TC* sv = sn.ptr<TC>() + b * sn.strides[0] + s * sn.strides[1];
      const int64_t xs = x.strides[3], os = out.strides[3], ccs = cs.strides[2], sns = sn.strides[2];
      // The sign pattern is folded into two coefficients so both directions share one loop:
      // forward  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2
      // inverse  y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1
      for (int64_t j = 0; j < half; j++) {
        const C x1 = static_cast<C>(Tr<TX>::ld(xr + j * xs)), x2 = static_cast<C>(Tr<TX>::ld(xr + (j + half) * xs));
        const C c1 = static_cast<C>(Tr<TC>::ld(c + j * ccs)), c2 = static_cast<C>(Tr<TC>::ld(c + (j + half) * ccs));
        const C s1 = static_cast<C>(Tr<TC>::ld(sv + j * sns)), s2 = static_cast<C>(Tr<TC>::ld(sv + (j + half) * sns));
        C y1, y2;
        if (inverse) {
          y1 = x1 * c1 + x2 * s2;
          y2 = x2 * c2 - x1 * s1;
        } else {
          y1 = x1 * c1 - x2 * s1;
          y2 = x2 * c2 + x1 * s2;
        }
        Tr<TX>::st(o + j * os, static_cast<typename Tr<TX>::C>(y1));
        Tr<TX>::st(o + (j + half) * os, static_cast<typename Tr<TX>::C>(y2));
      }
      for (int64_t j = R; j < D; j++) o[j * os] = xr[j * xs];
    }
  });
}

template <typename TX>
void rope_dispatch_cos(const TensorArg& out, const TensorArg& x, const TensorArg& cs, const TensorArg& sn,
                       bool inverse) {
  switch (cs.dtype) {
    case DType::F32: rope_run<TX, float>(out, x, cs, sn, inverse); break;
    case DType::F64: rope_run<TX, double>(out, x, cs, sn, inverse); break;
    case DType::BF16: rope_run<TX, bf16>(out, x, cs, sn, inverse); break;
    case DType::F16: rope_run<TX, f16>(out, x, cs, sn, inverse); break;
    default: throw_error("rope: cos/sin must be floating-point");
  }
}

}  // namespace

// ropeApply(out, x, cos, sin, inverse)
MP_ENTRY(RopeApplyK) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor(), cs = a.tensor(), sn = a.tensor();
  bool inverse = a.i32() != 0;
  if (x.ndim != 4 || out.ndim != 4 || cs.ndim != 3 || sn.ndim != 3) throw_error("rope: bad argument ranks");
  if (out.dtype != x.dtype) throw_error("rope: output dtype must equal the input dtype");
  if (cs.dtype != sn.dtype) throw_error("rope: cos and sin must share a dtype");
  if (cs.shape[2] % 2 != 0 || cs.shape[2] > x.shape[3]) throw_error("rope: bad rotary dimension");
  if (x.numel() == 0) return info.Env().Undefined();
  MP_DISPATCH_FLOAT(x.dtype, rope_dispatch_cos, out, x, cs, sn, inverse);
  return info.Env().Undefined();
}

void register_rope(Napi::Env env, Napi::Object exports) {
  exports.Set("ropeApply", Napi::Function::New(env, RopeApplyK));
}

}  // namespace mp
