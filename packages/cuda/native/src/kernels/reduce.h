// Host launchers of the reductions along one dimension of a contiguous tensor viewed as
// [outer, R, inner] (sum, mean, max/min with optional indices, argmax/argmin, var with a
// correction, logsumexp, p-norm, prod) and of the cumulative sum. Semantics of @megapatch/tensor's
// native/src/reduce.cc: everything accumulates in double; the first NaN wins max/min/argmax/argmin
// and the first extreme wins ties. Op codes match REDUCE of src/backend/cpu.ts.
#pragma once

#include "common.cuh"

namespace mpc {

enum ReduceOp : int {
  kReduceSum = 0, kReduceMean, kReduceMax, kReduceMin, kReduceArgmax, kReduceArgmin, kReduceVar,
  kReduceLogsumexp, kReduceNorm, kReduceProd, kReduceOpCount
};

// x contiguous with x's dtype; `out` (outer * inner elements, contiguous) has x's dtype, or int64
// for argmax/argmin; `indices` (nullable, int64, contiguous) receives the argmax/argmin of
// max/min. p: the correction of var, the order of norm. R >= 1 (the entry rejects R == 0).
void reduce(cudaStream_t s, const TensorArg& x, const TensorArg& out, const TensorArg* indices, int64_t outer,
            int64_t R, int64_t inner, int op, double p);

// Cumulative sum along R of contiguous x into contiguous out (same dtype), accumulated in double
// in the order of r, as the CPU.
void cumsum(cudaStream_t s, const TensorArg& x, const TensorArg& out, int64_t outer, int64_t R, int64_t inner);

}  // namespace mpc
