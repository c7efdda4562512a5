// The part of NCCL's C ABI that the NCCL process group uses, declared here so that the addon
// needs neither nccl.h nor libnccl at build time: a GPU build loads libnccl.so.2 when a group
// first needs it (dlopen), and the emulator build binds the same table to its own implementation
// (native/emu/nccl_emu.cc), which runs the collectives between processes over a shared file.
// The values are those of NCCL 2.x's public header, stable across its releases.
#pragma once

#include <cstddef>

#include "../kernels/common.cuh"

namespace mpc {

using nccl_result = int;  // ncclResult_t: 0 = ncclSuccess
using nccl_comm = void*;  // ncclComm_t

constexpr int kNcclIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES
struct NcclUniqueId {
  char internal[kNcclIdBytes];
};

// ncclDataType_t
enum NcclType : int {
  kNcclInt8 = 0,
  kNcclUint8 = 1,
  kNcclInt32 = 2,
  kNcclInt64 = 4,
  kNcclFloat16 = 6,
  kNcclFloat32 = 7,
  kNcclFloat64 = 8,
  kNcclBfloat16 = 9,
};

// ncclRedOp_t
enum NcclOp : int { kNcclSum = 0, kNcclProd = 1, kNcclMax = 2, kNcclMin = 3, kNcclAvg = 4 };

// ncclResult_t values named in error messages
constexpr nccl_result kNcclSuccess = 0;
constexpr nccl_result kNcclSystemError = 2;
constexpr nccl_result kNcclInvalidArgument = 4;
constexpr nccl_result kNcclInvalidUsage = 5;
constexpr nccl_result kNcclRemoteError = 6;

// The functions, by their NCCL names without the prefix.
struct NcclApi {
  nccl_result (*GetVersion)(int* version);
  nccl_result (*GetUniqueId)(NcclUniqueId* id);
  nccl_result (*CommInitRank)(nccl_comm* comm, int nranks, NcclUniqueId id, int rank);
  nccl_result (*CommDestroy)(nccl_comm comm);
  nccl_result (*CommAbort)(nccl_comm comm);
  nccl_result (*CommGetAsyncError)(nccl_comm comm, nccl_result* error);
  const char* (*GetErrorString)(nccl_result result);
  const char* (*GetLastError)(nccl_comm comm);  // NCCL >= 2.13; may be null
  nccl_result (*AllReduce)(const void* send, void* recv, size_t count, int type, int op, nccl_comm comm,
                           cudaStream_t stream);
  nccl_result (*Broadcast)(const void* send, void* recv, size_t count, int type, int root, nccl_comm comm,
                           cudaStream_t stream);
  nccl_result (*ReduceScatter)(const void* send, void* recv, size_t recvcount, int type, int op, nccl_comm comm,
                               cudaStream_t stream);
  nccl_result (*AllGather)(const void* send, void* recv, size_t sendcount, int type, nccl_comm comm,
                           cudaStream_t stream);
  nccl_result (*Send)(const void* send, size_t count, int type, int peer, nccl_comm comm, cudaStream_t stream);
  nccl_result (*Recv)(void* recv, size_t count, int type, int peer, nccl_comm comm, cudaStream_t stream);
  nccl_result (*GroupStart)();
  nccl_result (*GroupEnd)();
};

#ifdef MEGAPATCH_CUDA_EMULATOR
// The emulator's NCCL (native/emu/nccl_emu.cc).
const NcclApi& emulated_nccl();
#endif

}  // namespace mpc
