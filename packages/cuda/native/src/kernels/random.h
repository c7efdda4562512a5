// Host launcher of the random-number kernel: Philox 4x32-10 (Salmon et al., SC'11), counter
// based, so element i of a draw depends only on (seed, offset, i) and the stream is the same as
// @megapatch/tensor's CPU backend (native/src/random.cc): block j of a draw uses counter
// (offset + j, 0, 0, 0) under key (k0, k1) and yields the four 32-bit words of elements
// 4j..4j+3. Distributions match DIST of src/backend/cpu.ts.
#pragma once

#include "common.cuh"

namespace mpc {

enum RandomDist : int { kDistUniform = 0, kDistNormal = 1, kDistRandint = 2, kDistBernoulli = 3 };

// Fills contiguous `out` (any dtype): uniform [a, b), normal (mean a, std b; Box-Muller), randint
// [a, b), bernoulli (1 with probability a; any other dist code too, as the CPU). The caller
// advances its offset by ceil(numel / 4).
void philox(cudaStream_t s, const TensorArg& out, int dist, uint32_t k0, uint32_t k1, uint64_t offset, double a,
            double b);

// One Philox 4x32-10 block on the host (the same function the kernel runs): out = the four
// words of counter (c[0..3]) under key (k0, k1). For the known-answer tests.
void philox_block(const uint32_t c[4], uint32_t k0, uint32_t k1, uint32_t out[4]);

}  // namespace mpc
