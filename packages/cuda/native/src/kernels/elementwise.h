// Host launchers of the elementwise kernels: strided copies with dtype conversion, fills, unary
// math, binary arithmetic and comparisons (tensor-tensor with broadcasting, tensor-scalar), the
// fused activation backward helpers, and `where`. Op codes match UNARY / BINARY of
// @megapatch/tensor's src/backend/cpu.ts.
#pragma once

#include "common.cuh"

namespace mpc {

// the op codes of unary and binary
enum Unary : int {
  kNeg = 0, kExp, kLog, kSqrt, kRsqrt, kAbs, kTanh, kSigmoid, kSilu, kGelu, kGeluTanh, kRelu, kSin, kCos,
  kSquare, kReciprocal, kSign, kLog1p, kExpm1, kFloor, kCeil, kRound, kClamp, kLogicalNot, kIsNan, kIsInf,
  kUnaryCount
};

enum Binary : int {
  kAdd = 0, kSub, kMul, kDiv, kPow, kMaximum, kMinimum, kEq, kNe, kLt, kLe, kGt, kGe, kAnd, kOr,
  kSiluBackward, kGeluBackward, kGeluTanhBackward, kSigmoidBackward, kTanhBackward, kReluBackward, kAtan2,
  kBinaryCount
};

void copy(cudaStream_t s, const TensorArg& dst, const TensorArg& src);
void fill(cudaStream_t s, const TensorArg& t, double value);
void unary(cudaStream_t s, const TensorArg& out, const TensorArg& x, int op, double p0, double p1);
void binary(cudaStream_t s, const TensorArg& out, const TensorArg& x, const TensorArg& y, int op, double alpha);
void binary_scalar(cudaStream_t s, const TensorArg& out, const TensorArg& x, double scalar, int op, bool reverse);
void where(cudaStream_t s, const TensorArg& out, const TensorArg& cond, const TensorArg& x, const TensorArg& y);
// dst += src rounded to dst's dtype (the accumulateGrad named kernel); same shapes, any strides
void accumulate_grad(cudaStream_t s, const TensorArg& dst, const TensorArg& src);

}  // namespace mpc
