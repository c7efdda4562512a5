// Fused scaled-dot-product attention (FlashAttention-2 algorithm) on CUDA cores: the twin of
// @megapatch/tensor's native/src/attention.cc, with the same semantics (see attention.h).
//
// Forward: one block per (batch, query head, tile of query rows) and chunk of output columns. Key
// tiles stream through shared memory; the scores of a tile are masked and folded into a running
// (max, sum) softmax per row, so [Sq, Sk] never exists beyond one tile. The per-row logsumexp is
// saved for the backward.
// Backward: probabilities are recomputed from the saved logsumexp.
//  1. attn_delta_kernel: delta_i = rowsum(dO * O) into a stream-ordered workspace;
//  2. attn_dkdv_kernel: one block owns (batch, kv head, key tile) and loops over every query head
//     of its group and every query tile that can see its keys, accumulating dK and dV in registers:
//     no atomics, deterministic;
//  3. attn_dq_kernel: one block owns (batch, query head, query tile) and loops over the key tiles
//     its rows attend to, accumulating dQ in registers.
// (The tensor-core path can fold 3 into 2 instead: MEGAPATCH_ATTENTION_BWD=fused, see
// attn_dkdv_mma_kernel.)
//
// Block order: a block's tile index is the slowest-varying part of blockIdx.x, so under a causal
// mask the blocks with the most work (the last query tiles of the forward and dq, the first key
// tiles of dk/dv) start first, over every (batch, head), and the short ones fill the last wave
// (longest-processing-time-first; with the tile index fastest the last wave held whole long
// blocks: ncu counted 3.9 waves for the dk/dv kernel at B 4, H 32 / 8, S 2048).
//
// Thread layout (all three tile kernels, 128 threads = 16 row groups x 8 lanes): a block's score
// tile is [BR = 16 * RM rows, BC = 8 * CN columns]; thread (ty, tx) owns rows ty * RM + r (r < RM)
// and columns tx + 8 * c (c < CN), so the 8 lanes of a row group hold a whole row and reduce it
// with three xor shuffles. Accumulators ([rows, W] output chunks) hold columns tx + 8 * k (k < W/8)
// of the thread's rows. Operand tiles live in shared memory as the compute type (float, or double
// for float64) with rows padded by one element, which keeps the column-strided reads of the dot
// products free of bank conflicts.
//
// Head dims: W (the width of an output chunk in registers) is 64, 128 or 256 by the head dim; a
// wider output is split over gridDim.z chunks that each recompute the scores. Shared memory
// grows with D and Dv (operands are held whole for the dot products): up to 256 in every dtype.
//
// Tensor cores: bf16 / f16 inputs with D, Dv in {64, 128} on sm_80+ take the mma.sync m16n8k16
// kernels (attn_fwd_mma_kernel, attn_dkdv_mma_kernel, attn_dq_mma_kernel; mma.cuh, which the
// emulator runs too) with 16-bit operand tiles in shared memory read by ldmatrix and fp32
// accumulators; MEGAPATCH_ATTENTION_MMA=0 forces the CUDA-core kernels below, which handle every
// other case and are the reference. The forward also comes with 128-row tiles (two m-tiles a warp,
// MEGAPATCH_ATTENTION_FWD_ROWS=128), measured 1.05-1.53x slower on an H200. Tiles that no row of a
// warp needs masked (all but the diagonal ones of a causal mask, without an explicit mask) skip
// the per-element range checks in all three kernels, and their softmax runs in log2 units (exp2f,
// the scale folded into one multiply). Next step for speed: on sm_90, wgmma with TMA tile loads.
#include "attention_impl.cuh"

namespace mpc {

using namespace att;

void attention_forward(cudaStream_t s, const TensorArg& out, const TensorArg& lse, const TensorArg& q,
                       const TensorArg& k, const TensorArg& v, const AttentionOptions& o) {
  Params P = make_params(q, k, v, o);
  if (out.dtype != q.dtype) throw_error("attention: output dtype must equal the input dtype");
  const DType lse_dt = q.dtype == DType::F64 ? DType::F64 : DType::F32;
  if (lse.dtype != lse_dt || lse.ndim != 3) throw_error("attention: bad logsumexp buffer");
  if (out.ndim != 4 || out.shape[0] != P.B || out.shape[1] != P.Hq || out.shape[2] != P.Sq || out.shape[3] != P.Dv)
    throw_error("attention: out must be [B, Hq, Sq, Dv]");
  if (lse.shape[0] != P.B || lse.shape[1] != P.Hq || lse.shape[2] != P.Sq)
    throw_error("attention: lse must be [B, Hq, Sq]");
  if (out.numel() == 0) return;
  P.o = mat_of(out);
  P.lse = mat_of(lse);
  switch (q.dtype) {
    case DType::F32: forward_typed<float>(P, s); break;
    case DType::F64: forward_typed<double>(P, s); break;
    case DType::BF16: forward_typed<bf16>(P, s); break;
    case DType::F16: forward_typed<f16>(P, s); break;
    default: throw_error("attention: expected floating-point inputs");
  }
}

void attention_backward(cudaStream_t s, const TensorArg& dq, const TensorArg& dk, const TensorArg& dv,
                        const TensorArg& gout, const TensorArg& q, const TensorArg& k, const TensorArg& v,
                        const TensorArg& out, const TensorArg& lse, const AttentionOptions& o) {
  Params P = make_params(q, k, v, o);
  for (const TensorArg* t : {&dq, &dk, &dv, &gout, &out})
    if (t->dtype != q.dtype) throw_error("attention backward: gradients must share the input dtype");
  const DType lse_dt = q.dtype == DType::F64 ? DType::F64 : DType::F32;
  if (lse.dtype != lse_dt || lse.ndim != 3) throw_error("attention: bad logsumexp buffer");
  for (const TensorArg* t : {&dq, &dk, &dv, &gout, &out})
    if (t->ndim != 4) throw_error("attention backward: gradients and out must be 4-D");
  for (int d = 0; d < 4; d++) {
    if (dq.shape[d] != q.shape[d] || dk.shape[d] != k.shape[d] || dv.shape[d] != v.shape[d])
      throw_error("attention backward: dq, dk, dv must have the shapes of q, k, v");
    if (gout.shape[d] != out.shape[d]) throw_error("attention backward: gradOut must have the shape of out");
  }
  if (out.shape[0] != P.B || out.shape[1] != P.Hq || out.shape[2] != P.Sq || out.shape[3] != P.Dv)
    throw_error("attention: out must be [B, Hq, Sq, Dv]");
  if (dq.numel() + dk.numel() + dv.numel() == 0) return;
  P.o = mat_of(out);
  P.go = mat_of(gout);
  P.lse = mat_of(lse);
  P.dq = mat_of(dq);
  P.dk = mat_of(dk);
  P.dv = mat_of(dv);
  switch (q.dtype) {
    case DType::F32: backward_typed<float>(P, s); break;
    case DType::F64: backward_typed<double>(P, s); break;
    case DType::BF16: backward_typed<bf16>(P, s); break;
    case DType::F16: backward_typed<f16>(P, s); break;
    default: throw_error("attention: expected floating-point inputs");
  }
}

}  // namespace mpc
