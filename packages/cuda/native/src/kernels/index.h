// Host launchers of the index kernels (the CUDA twin of @megapatch/tensor's native/src/index.cc):
// row gathers and deterministic row accumulation (embedding, indexSelect, indexAdd), gather and
// scatter-add along one dimension, top-k along a dimension, triangular masks and one-hot.
//
// The index-checking launchers take `bad`, a float64 device tensor of 2 elements, and always fill
// it on the stream with [position, value] of the first (lowest row-major position) index outside
// its range, or [-1, 0]. The main kernels skip rejected indices, so nothing outside the tensors is
// ever touched; what they wrote is meaningless when `bad` reports an index, and the op raises.
//
// index_add_rows, scatter_add_along (few long lines) and topk_along (lines over 4096) sort on the
// device in scratch memory allocated and freed on the stream (cudaMallocAsync) within the call.
#pragma once

#include "common.cuh"

namespace mpc {

// out [outer, L, inner] = x [outer, S, inner] rows index[i] (a byte copy: every dtype alike).
void index_select_rows(cudaStream_t s, const TensorArg& out, const TensorArg& x, const TensorArg& index,
                       int64_t outer, int64_t S, int64_t inner, const TensorArg& bad);
// out [outer, S, inner] = (base or 0) + alpha * sum over {i : index[i] == row, index[i] != skip}
// of src [outer, L, inner] row i, summed in increasing i in the compute type, rounded once.
void index_add_rows(cudaStream_t s, const TensorArg& out, const TensorArg* base, const TensorArg& src,
                    const TensorArg& index, int64_t outer, int64_t S, int64_t inner, double alpha, int64_t skip,
                    const TensorArg& bad);
// out[p] = x[p with p[dim] = index[p]] over the positions p of index (out has index's shape).
void gather_along(cudaStream_t s, const TensorArg& out, const TensorArg& x, const TensorArg& index, int dim,
                  const TensorArg& bad);
// out[p with p[dim] = index[p]] += alpha * src[p] in place, each line along dim in index order.
void scatter_add_along(cudaStream_t s, const TensorArg& out, const TensorArg& src, const TensorArg& index, int dim,
                       double alpha, const TensorArg& bad);
// values (x's dtype) and indices (int64) [outer, k, inner] of x [outer, R, inner], all contiguous:
// sorted, NaN above every number, ties lowest position first.
void topk_along(cudaStream_t s, const TensorArg& values, const TensorArg& indices, const TensorArg& x,
                int64_t outer, int64_t R, int64_t inner, int64_t k, bool largest);
// triu (upper) / tril of the last two dims of x (any strides) into contiguous out.
void triangle_mask(cudaStream_t s, const TensorArg& out, const TensorArg& x, int64_t diagonal, bool upper);
// out int64 [n, classes] (zero-filled by the caller) gets 1 at [i, index[i]].
void one_hot(cudaStream_t s, const TensorArg& out, const TensorArg& index, int64_t classes, const TensorArg& bad);

}  // namespace mpc
