// Grouped GEMMs whose group sizes live on the device (gemm.h grouped_gemm_sized): the host builds
// each problem's table entry with the split dimension unknown, and plan_sized_kernel fills it in
// where the sizes are, in stream order, before the grouped kernel's launch: the sizes' exclusive
// prefix moves the shared operands to each group's first row, the split dimension becomes the
// group's size, and the tiles are renumbered (a group's first tile after the earlier groups'). The
// grouped kernel then runs over a grid sized for the worst case and reads the real tile count.
// Included by gemm.cu (the tiled kernel's GroupedEntry) and gemm_grouped_mma.cu (MmaEntry).
#pragma once

#include <cstdint>

#include "gemm.h"

namespace mpc {

// What the plan reads besides the table: which dimension the groups split (0: the rows, M = n_g,
// A's and C's rows move; 1: the reduction, K = n_g, A's and B's k move), the rows they split, the
// sizes (int64 [count]) and the bytes one row of the split moves A, B and C.
struct SizedPlan {
  int64_t split, total;
  const int64_t* sizes;
  int64_t a_step, b_step, c_step;
};

// One thread walks the groups (a few hundred at most): a size below 0 counts as 0, and the sizes
// are clamped to the rows left, so a bad size never reaches outside the operands (the caller's
// deferred check reports it). BM: the kernel's tile rows. total_tiles: where the count goes.
template <typename E, int BM>
__global__ void __launch_bounds__(1) plan_sized_kernel(E* table, int64_t count, SizedPlan s, int64_t* total_tiles) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int64_t start = 0, tiles = 0;
  for (int64_t g = 0; g < count; g++) {
    int64_t n = s.sizes[g];
    if (n < 0) n = 0;
    if (n > s.total - start) n = s.total - start;
    E& e = table[g];
    e.a += start * s.a_step;
    e.b += start * s.b_step;
    e.c += start * s.c_step;
    if (s.split == 0) e.M = n;
    else e.K = n;
    e.tile_start = tiles;
    tiles += ((e.M + BM - 1) / BM) * e.ntiles_n;
    start += n;
  }
  *total_tiles = tiles;
}

// The plan of problem p's groups (all share their strides): the bytes one row of the split moves
// each operand.
inline SizedPlan sized_plan(const GemmProblem& p, const SizedGroups& g, size_t itemsize) {
  const int64_t z = static_cast<int64_t>(itemsize);
  if (g.split == 0) return SizedPlan{0, g.total, g.sizes, p.a.rs * z, 0, p.c.rs * z};
  return SizedPlan{1, g.total, g.sizes, p.a.cs * z, p.b.rs * z, 0};
}

// The most tiles the groups can have: split rows, each group's partial tile beside the
// ceil(total / BM) whole ones; split k, every group's M x N tiles (M, N fixed).
inline int64_t sized_max_tiles(int64_t split, int64_t total, int64_t count, int64_t M, int64_t ntiles_n, int64_t bm) {
  return split == 0 ? ((total + bm - 1) / bm + count) * ntiles_n : count * ((M + bm - 1) / bm) * ntiles_n;
}

}  // namespace mpc
