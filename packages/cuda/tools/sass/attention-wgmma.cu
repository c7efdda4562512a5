// The bf16 D 64 wgmma attention kernels (sm_90a, MEGAPATCH_ATTENTION_WGMMA*), instantiated on their
// own for the machine code tools (run.sh attention-wgmma.cu): the overlapped forward with 64 and
// 128 keys a tile, two warpgroups of 64-key tiles, the warp-specialised forward; dK/dV and dQ with
// one warpgroup, two, and warp-specialised.
#include "attention_impl.cuh"
namespace mpc {
namespace att {
template __global__ void attn_fwd_mma_kernel<bf16, 64, 64, true, 1, 0, 64, true, 1>(Params);
template __global__ void attn_fwd_mma_kernel<bf16, 64, 64, true, 1, 0, 128, true, 1>(Params);
template __global__ void attn_fwd_mma_kernel<bf16, 64, 64, true, 1, 0, 64, true, 2>(Params);
template __global__ void attn_fwd_mma_kernel<bf16, 64, 64, true, 1, 1, 64, true, 2, true>(Params);
template __global__ void attn_dkdv_mma_kernel<bf16, 64, 64, 64, true, false, 0, true>(Params);
template __global__ void attn_dkdv_mma_kernel<bf16, 64, 64, 64, true, false, 0, true, 2>(Params);
template __global__ void attn_dkdv_mma_kernel<bf16, 64, 64, 64, true, false, 1, true, 2, true>(Params);
template __global__ void attn_dq_mma_kernel<bf16, 64, 64, 64, true, 0, true>(Params);
template __global__ void attn_dq_mma_kernel<bf16, 64, 64, 64, true, 0, true, 2>(Params);
template __global__ void attn_dq_mma_kernel<bf16, 64, 64, 64, true, 1, true, 2, true>(Params);
}  // namespace att
}  // namespace mpc
