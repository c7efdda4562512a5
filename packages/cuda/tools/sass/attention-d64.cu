// The default bf16 D 64 tensor-core attention kernels, instantiated on their own for the machine
// code tools (run.sh): the forward (capped at 4 blocks an SM, and uncapped; and with 128-key tiles,
// MEGAPATCH_ATTENTION_FWD_KEYS=128), dK/dV (capped at 3, and uncapped) and dQ.
#include "attention_impl.cuh"
namespace mpc {
namespace att {
template __global__ void attn_fwd_mma_kernel<bf16, 64, 64, true, 1, 4>(Params);
template __global__ void attn_fwd_mma_kernel<bf16, 64, 64, true, 1, 0>(Params);
template __global__ void attn_fwd_mma_kernel<bf16, 64, 64, true, 1, 0, 0, false, 1, false, 128>(Params);
template __global__ void attn_dkdv_mma_kernel<bf16, 64, 64, 64, true, false, 3>(Params);
template __global__ void attn_dkdv_mma_kernel<bf16, 64, 64, 64, true, false, 0>(Params);
template __global__ void attn_dq_mma_kernel<bf16, 64, 64, 64, true, 0>(Params);
}  // namespace att
}  // namespace mpc
