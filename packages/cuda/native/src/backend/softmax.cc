// N-API entries of the softmax family (kernels/softmax.h), with the argument order of
// @megapatch/tensor's CPU entries (native/src/softmax.cc) plus, for the two forward losses, the
// `stats` tensor last (float64 [4], filled on the stream with LOSS_STATS; see
// src/kernels/softmax.ts). Nothing is returned: the losses answer in `stats` on the device.
#include "../kernels/softmax.h"
#include "glue.h"

namespace mpc {

// softmaxForward(out, x, log)
MPC_ENTRY(SoftmaxForwardE) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor();
  bool log = a.i32() != 0;
  softmax_forward(current_stream(), out, x, log);
  return info.Env().Undefined();
}

// softmaxBackward(dx, y, g, log)
MPC_ENTRY(SoftmaxBackwardE) {
  Args a;
  TensorArg dx = a.tensor(), y = a.tensor(), g = a.tensor();
  bool log = a.i32() != 0;
  softmax_backward(current_stream(), dx, y, g, log);
  return info.Env().Undefined();
}

// crossEntropyForward(logits, target, lse, hasLoss, loss?, ignoreIndex, smoothing, stats)
MPC_ENTRY(CrossEntropyForwardE) {
  Args a;
  TensorArg x = a.tensor(), target = a.tensor(), lse = a.tensor();
  bool has_loss = a.i32() != 0;
  TensorArg loss;
  if (has_loss) loss = a.tensor();
  int64_t ignore = a.i64();
  double eps = a.num();
  TensorArg stats = a.tensor();
  cross_entropy_forward(current_stream(), x, target, lse, has_loss ? &loss : nullptr, ignore, eps, stats);
  return info.Env().Undefined();
}

// crossEntropyBackward(dx, logits, target, lse, gout, scale, ignoreIndex, smoothing)
MPC_ENTRY(CrossEntropyBackwardE) {
  Args a;
  TensorArg dx = a.tensor(), x = a.tensor(), target = a.tensor(), lse = a.tensor(), gout = a.tensor();
  double scale = a.num();
  int64_t ignore = a.i64();
  double eps = a.num();
  cross_entropy_backward(current_stream(), dx, x, target, lse, gout, scale, ignore, eps);
  return info.Env().Undefined();
}

// nllLossForward(logProbs, target, hasLoss, loss?, ignoreIndex, stats)
MPC_ENTRY(NllLossForwardE) {
  Args a;
  TensorArg x = a.tensor(), target = a.tensor();
  bool has_loss = a.i32() != 0;
  TensorArg loss;
  if (has_loss) loss = a.tensor();
  int64_t ignore = a.i64();
  TensorArg stats = a.tensor();
  nll_loss_forward(current_stream(), x, target, has_loss ? &loss : nullptr, ignore, stats);
  return info.Env().Undefined();
}

// nllLossBackward(dx, target, gout, scale, ignoreIndex)
MPC_ENTRY(NllLossBackwardE) {
  Args a;
  TensorArg dx = a.tensor(), target = a.tensor(), gout = a.tensor();
  double scale = a.num();
  int64_t ignore = a.i64();
  nll_loss_backward(current_stream(), dx, target, gout, scale, ignore);
  return info.Env().Undefined();
}

// crossEntropyShardMax(rowMax, logits, localReal)
MPC_ENTRY(CrossEntropyShardMaxE) {
  Args a;
  TensorArg row_max = a.tensor(), x = a.tensor();
  int64_t real = a.i64();
  cross_entropy_shard_max(current_stream(), row_max, x, real);
  return info.Env().Undefined();
}

// crossEntropyShardForward(predicted, sumExp, hasShiftedSum, shiftedSum?, logits, target, rowMax,
// start, localReal)
MPC_ENTRY(CrossEntropyShardForwardE) {
  Args a;
  TensorArg pred = a.tensor(), sum_exp = a.tensor();
  bool has_shifted = a.i32() != 0;
  TensorArg shifted;
  if (has_shifted) shifted = a.tensor();
  TensorArg x = a.tensor(), target = a.tensor(), row_max = a.tensor();
  int64_t start = a.i64(), real = a.i64();
  cross_entropy_shard_forward(current_stream(), pred, sum_exp, has_shifted ? &shifted : nullptr, x, target, row_max,
                              start, real);
  return info.Env().Undefined();
}

// crossEntropyShardMaxStats(rowMax, predicted, sumExp, hasShiftedSum, shiftedSum?, logits, target,
// start, localReal)
MPC_ENTRY(CrossEntropyShardMaxStatsE) {
  Args a;
  TensorArg row_max = a.tensor(), pred = a.tensor(), sum_exp = a.tensor();
  bool has_shifted = a.i32() != 0;
  TensorArg shifted;
  if (has_shifted) shifted = a.tensor();
  TensorArg x = a.tensor(), target = a.tensor();
  int64_t start = a.i64(), real = a.i64();
  cross_entropy_shard_max_stats(current_stream(), row_max, pred, sum_exp, has_shifted ? &shifted : nullptr, x,
                                target, start, real);
  return info.Env().Undefined();
}

// crossEntropyShardBackward(dx, logits, target, rowMax, logSumExp, gradLoss, start, localReal,
// smoothing, vocabSize)
MPC_ENTRY(CrossEntropyShardBackwardE) {
  Args a;
  TensorArg dx = a.tensor(), x = a.tensor(), target = a.tensor(), row_max = a.tensor(), lse = a.tensor(),
            grad = a.tensor();
  int64_t start = a.i64(), real = a.i64();
  double alpha = a.num();
  int64_t vocab = a.i64();
  cross_entropy_shard_backward(current_stream(), dx, x, target, row_max, lse, grad, start, real, alpha, vocab);
  return info.Env().Undefined();
}

void register_softmax(Napi::Env env, Napi::Object exports) {
  exports.Set("softmaxForward", Napi::Function::New(env, SoftmaxForwardE));
  exports.Set("softmaxBackward", Napi::Function::New(env, SoftmaxBackwardE));
  exports.Set("crossEntropyForward", Napi::Function::New(env, CrossEntropyForwardE));
  exports.Set("crossEntropyBackward", Napi::Function::New(env, CrossEntropyBackwardE));
  exports.Set("nllLossForward", Napi::Function::New(env, NllLossForwardE));
  exports.Set("nllLossBackward", Napi::Function::New(env, NllLossBackwardE));
  exports.Set("crossEntropyShardMax", Napi::Function::New(env, CrossEntropyShardMaxE));
  exports.Set("crossEntropyShardForward", Napi::Function::New(env, CrossEntropyShardForwardE));
  exports.Set("crossEntropyShardMaxStats", Napi::Function::New(env, CrossEntropyShardMaxStatsE));
  exports.Set("crossEntropyShardBackward", Napi::Function::New(env, CrossEntropyShardBackwardE));
}

}  // namespace mpc
