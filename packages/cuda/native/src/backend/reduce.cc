// N-API entries of the reductions: reduce(x, out, hasIndices, [indices], outer, R, inner, op, p)
// and cumsum(x, out, outer, R, inner), packed as @megapatch/tensor's src/backend/cpu.ts packs
// them (x contiguous, viewed as [outer, R, inner]). The kernels are in kernels/reduce.cu.
#include "../kernels/reduce.h"
#include "glue.h"

namespace mpc {

MPC_ENTRY(ReduceEntry) {
  Args a;
  TensorArg x = a.tensor(), out = a.tensor();
  bool has_idx = a.i32() != 0;
  TensorArg idx;
  if (has_idx) idx = a.tensor();
  int64_t outer = a.i64(), R = a.i64(), inner = a.i64();
  int op = a.i32();
  double p = a.num();
  reduce(current_stream(), x, out, has_idx ? &idx : nullptr, outer, R, inner, op, p);
  return info.Env().Undefined();
}

MPC_ENTRY(CumsumEntry) {
  Args a;
  TensorArg x = a.tensor(), out = a.tensor();
  int64_t outer = a.i64(), R = a.i64(), inner = a.i64();
  cumsum(current_stream(), x, out, outer, R, inner);
  return info.Env().Undefined();
}

void register_reduce(Napi::Env env, Napi::Object exports) {
  exports.Set("reduce", Napi::Function::New(env, ReduceEntry));
  exports.Set("cumsum", Napi::Function::New(env, CumsumEntry));
}

}  // namespace mpc
