// Host launchers of the softmax family (the CUDA twin of @megapatch/tensor's
// native/src/softmax.cc): softmax / log-softmax over contiguous rows of the last dimension and
// their backward, fused cross-entropy (log-sum-exp, loss and label smoothing in one read of each
// row) with its backward, NLL loss, and the per-shard kernels of the vocabulary-parallel
// cross-entropy. Every launcher computes in float for 16/32-bit inputs and
// in double for float64, and only enqueues on the given stream.
//
// The loss launchers take `stats`, a contiguous float64 [4] device tensor, and always fill it on
// the stream with LOSS_STATS of @megapatch/tensor (src/ops/softmax.ts): [non-ignored rows
// counted (those before the first bad row when there is one), sum of the row losses in double (0
// with a bad target), first row whose target is neither ignoreIndex nor in [0, C) or -1, that
// target's value or 0]. With a bad target, lse and loss are left as they were.
#pragma once

#include "common.cuh"

namespace mpc {

// out = softmax (or log-softmax) of each row of x; out and x contiguous with one float dtype.
void softmax_forward(cudaStream_t s, const TensorArg& out, const TensorArg& x, bool log);
// softmax: dx = y * (g - sum(g * y)); log-softmax: dx = g - exp(y) * sum(g) (0 on a row of -inf).
void softmax_backward(cudaStream_t s, const TensorArg& dx, const TensorArg& y, const TensorArg& g, bool log);
// Row losses of logits x [rows, C] against target [rows] (int32/int64): lse [rows] (float32, float64
// for float64 x; 0 on ignored rows), loss [rows] in x's dtype when given, and stats.
void cross_entropy_forward(cudaStream_t s, const TensorArg& x, const TensorArg& target, const TensorArg& lse,
                           const TensorArg* loss, int64_t ignore, double eps, const TensorArg& stats);
// dx = (softmax - eps / C - (1 - eps) [c == t]) * gout[row] * scale; 0 on ignored or bad rows.
void cross_entropy_backward(cudaStream_t s, const TensorArg& dx, const TensorArg& x, const TensorArg& target,
                            const TensorArg& lse, const TensorArg& gout, double scale, int64_t ignore, double eps);
// Row losses -x[r, t_r] of log-probabilities x [rows, C] into loss when given, and stats.
void nll_loss_forward(cudaStream_t s, const TensorArg& x, const TensorArg& target, const TensorArg* loss,
                      int64_t ignore, const TensorArg& stats);
// dx [rows, C]: -gout[row] * scale at the target column, 0 elsewhere and on ignored or bad rows.
void nll_loss_backward(cudaStream_t s, const TensorArg& dx, const TensorArg& target, const TensorArg& gout,
                       double scale, int64_t ignore);

// Vocabulary-parallel cross-entropy, one rank's slice x [rows, P] of the vocabulary starting at
// global id `start`, real columns [0, real) (the rest is padding); all [rows] vectors in the
// compute type. Max: row_max = the maximum over the real columns of each row (a NaN wins; -inf
// when real is 0), before the group's all-reduce.
void cross_entropy_shard_max(cudaStream_t s, const TensorArg& row_max, const TensorArg& x, int64_t real);
// Forward, with row_max the group's row maximum: predicted = x[t - start] - max when that column
// is real (else 0), sum_exp = sum exp(x - max), shifted_sum (when given) = sum (x - max) over the
// real columns.
void cross_entropy_shard_forward(cudaStream_t s, const TensorArg& predicted, const TensorArg& sum_exp,
                                 const TensorArg* shifted_sum, const TensorArg& x, const TensorArg& target,
                                 const TensorArg& row_max, int64_t start, int64_t real);
// Both in one pass over the logits for a group of one rank: row_max as the max kernel writes it,
// and the forward's statistics against it (sum_exp through the online log-sum-exp).
void cross_entropy_shard_max_stats(cudaStream_t s, const TensorArg& row_max, const TensorArg& predicted,
                                   const TensorArg& sum_exp, const TensorArg* shifted_sum, const TensorArg& x,
                                   const TensorArg& target, int64_t start, int64_t real);
// dx = (exp((x - max) - lse) - alpha / vocab - (1 - alpha) [column is the target]) * grad[row] on
// the real columns, 0 on the padding; dx in x's dtype.
void cross_entropy_shard_backward(cudaStream_t s, const TensorArg& dx, const TensorArg& x, const TensorArg& target,
                                  const TensorArg& row_max, const TensorArg& lse, const TensorArg& grad,
                                  int64_t start, int64_t real, double alpha, int64_t vocab);

}  // namespace mpc
