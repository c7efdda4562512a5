#!/usr/bin/env bash
# The emulator built with UBSan's alignment check (-fsanitize=alignment, stopping at the first
# report), then the emulator suites on it: a kernel that loads or stores a vector type (Pack, Vec,
# uint4, float2) at an address that type's alignment does not divide runs on the CPU (x86 allows
# it) but faults on a GPU ("misaligned address"); here it stops with UBSan's report instead.
# cp.async, ldmatrix and atomic_add2 check their own addresses in every emulator build.
#   bash packages/cuda/tools/align/run.sh [OUT]   (OUT: the build folder, /tmp/megapatch-emu-align)
# Session 33: 3.5 min to build, then kernels 1200 + 17 skipped, conformance 897, mma 12, the
# package 69, train device 6, models grouped/other-backend 33, parallel collectives 23: clean.
set -euo pipefail
pkg=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${1:-/tmp/megapatch-emu-align}
cd "$pkg"
MEGAPATCH_NO_CUDA=1 npx cmake-js build --out "$out" \
  --CDCMAKE_CXX_FLAGS="-fsanitize=alignment -fno-sanitize-recover=alignment" \
  --CDCMAKE_SHARED_LINKER_FLAGS="-fsanitize=alignment"
export MEGAPATCH_CUDA_EMU_NATIVE=$out/Release/megapatch_cuda_emu.node
[ -f "$MEGAPATCH_CUDA_EMU_NATIVE" ] || { echo "align: $MEGAPATCH_CUDA_EMU_NATIVE was not built" >&2; exit 1; }
rc=0
run() { # folder, vitest arguments
  local dir=$1
  shift
  echo "=== $dir: vitest run $*"
  (cd "$dir" && npx vitest run "$@") || rc=1
}
run . -c vitest.kernels.config.ts
run . -c vitest.conformance.config.ts
run .
run ../train test/device.test.ts
run ../models test/grouped-experts.test.ts test/other-backend.test.ts
run ../parallel test/collectives.test.ts
exit $rc
