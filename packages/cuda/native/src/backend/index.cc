// N-API entries of the index kernels (kernels/index.h), with the argument order of
// @megapatch/tensor's CPU entries (native/src/index.cc) plus, for the five index-checking
// kernels, the `bad` tensor last (float64 [2], filled on the stream with [position, value] of the
// first rejected index or [-1, 0]; see src/kernels/indexing.ts).
#include "../kernels/index.h"
#include "glue.h"

namespace mpc {

// indexSelectRows(out, x, index, outer, S, inner, bad)
MPC_ENTRY(IndexSelectRowsE) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor(), index = a.tensor();
  int64_t outer = a.i64(), S = a.i64(), inner = a.i64();
  TensorArg bad = a.tensor();
  index_select_rows(current_stream(), out, x, index, outer, S, inner, bad);
  return info.Env().Undefined();
}

// indexAddRows(out, hasBase, base?, src, index, outer, S, inner, alpha, skip, bad)
MPC_ENTRY(IndexAddRowsE) {
  Args a;
  TensorArg out = a.tensor();
  bool has_base = a.i32() != 0;
  TensorArg base;
  if (has_base) base = a.tensor();
  TensorArg src = a.tensor(), index = a.tensor();
  int64_t outer = a.i64(), S = a.i64(), inner = a.i64();
  double alpha = a.num();
  int64_t skip = a.i64();
  TensorArg bad = a.tensor();
  index_add_rows(current_stream(), out, has_base ? &base : nullptr, src, index, outer, S, inner, alpha, skip, bad);
  return info.Env().Undefined();
}

// gatherAlong(out, x, index, dim, bad)
MPC_ENTRY(GatherAlongE) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor(), index = a.tensor();
  int dim = a.i32();
  TensorArg bad = a.tensor();
  gather_along(current_stream(), out, x, index, dim, bad);
  return info.Env().Undefined();
}

// scatterAddAlong(out, src, index, dim, alpha, bad)
MPC_ENTRY(ScatterAddAlongE) {
  Args a;
  TensorArg out = a.tensor(), src = a.tensor(), index = a.tensor();
  int dim = a.i32();
  double alpha = a.num();
  TensorArg bad = a.tensor();
  scatter_add_along(current_stream(), out, src, index, dim, alpha, bad);
  return info.Env().Undefined();
}

// topk(values, indices, x, outer, R, inner, k, largest)
MPC_ENTRY(TopkE) {
  Args a;
  TensorArg values = a.tensor(), indices = a.tensor(), x = a.tensor();
  int64_t outer = a.i64(), R = a.i64(), inner = a.i64(), k = a.i64();
  bool largest = a.i32() != 0;
  topk_along(current_stream(), values, indices, x, outer, R, inner, k, largest);
  return info.Env().Undefined();
}

// triangle(out, x, diagonal, upper)
MPC_ENTRY(TriangleE) {
  Args a;
  TensorArg out = a.tensor(), x = a.tensor();
  int64_t diagonal = a.i64();
  bool upper = a.i32() != 0;
  triangle_mask(current_stream(), out, x, diagonal, upper);
  return info.Env().Undefined();
}

// oneHot(out, index, classes, bad)
MPC_ENTRY(OneHotE) {
  Args a;
  TensorArg out = a.tensor(), index = a.tensor();
  int64_t classes = a.i64();
  TensorArg bad = a.tensor();
  one_hot(current_stream(), out, index, classes, bad);
  return info.Env().Undefined();
}

void register_index(Napi::Env env, Napi::Object exports) {
  exports.Set("indexSelectRows", Napi::Function::New(env, IndexSelectRowsE));
  exports.Set("indexAddRows", Napi::Function::New(env, IndexAddRowsE));
  exports.Set("gatherAlong", Napi::Function::New(env, GatherAlongE));
  exports.Set("scatterAddAlong", Napi::Function::New(env, ScatterAddAlongE));
  exports.Set("topk", Napi::Function::New(env, TopkE));
  exports.Set("triangle", Napi::Function::New(env, TriangleE));
  exports.Set("oneHot", Napi::Function::New(env, OneHotE));
}

}  // namespace mpc
