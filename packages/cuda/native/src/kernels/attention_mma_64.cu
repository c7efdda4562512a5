// The tensor-core attention launches of head dims 64/64 (D/Dv), instantiated here
// apart from attention.cu so that nvcc compiles them in parallel (see attention_impl.cuh).
#include "attention_impl.cuh"

namespace mpc {
namespace att {

template void forward_mma_cfg<bf16, 64, 64>(const Params& P, cudaStream_t s);
template void backward_mma_cfg<bf16, 64, 64>(Params P, cudaStream_t s);
template void forward_mma_cfg<f16, 64, 64>(const Params& P, cudaStream_t s);
template void backward_mma_cfg<f16, 64, 64>(Params P, cudaStream_t s);

}  // namespace att
}  // namespace mpc
