#!/usr/bin/env bash
# Rehearses the device call here, without a GPU: copies what a device call sends (the tracked and
# the untracked, not ignored files of the working tree, plus the carried .gpu/ from prepare.sh) to a
# scratch folder without node_modules or builds, sources .gpu/setup.sh there, and runs gpu/run.sh
# on the emulator (MEGAPATCH_TEST_DEVICE=cudaemu:0 unless set; the bench there too, at its tiny
# sizes). Never in the checkout itself.
#   bash packages/cuda/gpu/rehearse.sh [scratch folder, default /tmp/gpu-rehearsal]   (logs: <folder>-out)
# CUBLASLT_PREFIX=<dir with include/ and lib/> stands in for the nvidia-cublas wheel (a cuBLASLt of
# nvcc's major version; the wheel itself: `pip download nvidia-cublas --no-deps`, unzipped, then
# CUBLASLT_PREFIX=<unzipped>/nvidia/cu13), so that the nvcc build and its link are rehearsed too;
# on a machine with 2 cores give it MEGAPATCH_GPU_TIMEOUT_SCALE=4 MEGAPATCH_GPU_BUDGET_S=2400
# MEGAPATCH_GPU_JOBS=2.
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
dst=${1:-/tmp/gpu-rehearsal}
case $(realpath -m "$dst") in "$root" | "$root"/*) echo "rehearse: $dst is inside the checkout" >&2; exit 2 ;; esac
[ -f "$root/.gpu/node_modules.tar.xz" ] || { echo "rehearse: run packages/cuda/gpu/prepare.sh first" >&2; exit 2; }
rm -rf "$dst" "$dst-out"
mkdir -p "$dst" "$dst-out"
cd "$root"
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  tar -cf - --null -T - | tar -xf - -C "$dst"
cp -a .gpu "$dst/.gpu"
rm -rf "$dst/.gpu/out"
cd "$dst"
echo "rehearse: $(du -sh . | cut -f1) in $dst"
set +eu
source .gpu/setup.sh
set -eu
if [ -n "${CUBLASLT_PREFIX:-}" ]; then
  export CPATH="$CUBLASLT_PREFIX/include${CPATH:+:$CPATH}" LIBRARY_PATH="$CUBLASLT_PREFIX/lib:$LIBRARY_PATH"
  export LD_LIBRARY_PATH="$CUBLASLT_PREFIX/lib:$LD_LIBRARY_PATH"
fi
export OUT=$dst-out MEGAPATCH_TEST_DEVICE=${MEGAPATCH_TEST_DEVICE:-cudaemu:0}
# the bench on the same device, at the tiny sizes on the emulator (its default is cuda:0, full size)
export MEGAPATCH_BENCH_DEVICE=${MEGAPATCH_BENCH_DEVICE:-$MEGAPATCH_TEST_DEVICE}
[[ $MEGAPATCH_BENCH_DEVICE == cudaemu* ]] && export MEGAPATCH_BENCH_TINY=${MEGAPATCH_BENCH_TINY:-1}
time bash packages/cuda/gpu/run.sh
