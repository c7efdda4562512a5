// Host launchers of the attention family (the CUDA twin of @megapatch/tensor's
// native/src/attention.cc): fused scaled-dot-product attention, flash-attention style, with
// grouped-query attention (query head h reads kv head h / (Hq / Hkv)), top-left aligned causal
// masking, packed variable-length rows (cuSeqlens) and an optional bool / additive mask. q, k, v
// are [B, H, S, D] views with any strides; arithmetic is fp32 for fp32/bf16/fp16 inputs and fp64
// for float64. The launchers only enqueue on the given stream.
#pragma once

#include "common.cuh"

namespace mpc {

struct AttentionOptions {
  bool has_mask = false;
  TensorArg mask;  // [B, Hq, Sq, Sk] view (stride 0 where broadcast), bool or floating-point
  bool has_cu = false;
  TensorArg cu;  // int32/int64 [nseq + 1] on the device, values validated by the caller
  bool causal = false;
  double scale = 1;
};

// out [B, Hq, Sq, Dv] (q's dtype) and lse [B, Hq, Sq] (float32, float64 for float64 inputs):
// softmax(q k^T * scale + mask) v and the per-row logsumexp; a row with nothing to attend to gives
// zeros and lse = -inf.
void attention_forward(cudaStream_t s, const TensorArg& out, const TensorArg& lse, const TensorArg& q,
                       const TensorArg& k, const TensorArg& v, const AttentionOptions& o);

// dq, dk, dv from gradOut, the forward's inputs, its output and lse. dk and dv add up the query
// heads sharing a kv head, deterministically (no atomics).
void attention_backward(cudaStream_t s, const TensorArg& dq, const TensorArg& dk, const TensorArg& dv,
                        const TensorArg& gout, const TensorArg& q, const TensorArg& k, const TensorArg& v,
                        const TensorArg& out, const TensorArg& lse, const AttentionOptions& o);

}  // namespace mpc
