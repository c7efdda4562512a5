#!/usr/bin/env bash
# The attention kernels' machine code without a GPU: registers and spills (ptxas), and each loop's
# instruction histogram (sass-loops.py), as compiled and with the fast paths forced
# (hot-paths.py: a main loop's count is then its cost for one whole tile).
#
# usage: packages/cuda/tools/sass/run.sh [UNIT.cu] [NAME-FILTER]
#   UNIT.cu  instantiations to compile (default: attention-d64.cu beside this script); it
#            includes "attention_impl.cuh" and is compiled against native/src/kernels
# Needs nvcc (CUDA 12 or later). Compiles as the package's build does on a GPU machine: sm_90a with
# MEGAPATCH_CUDA_WGMMA (the wgmma kernels too). The disassembler is CUDA 12.4's nvdisasm, from
# Debian trixie's non-free nvidia-cuda-toolkit package, downloaded and unpacked (not installed)
# into $MEGAPATCH_CUDATK (default /tmp/megapatch-cudatk12) on first use.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kernels=$(cd "$here/../../native/src/kernels" && pwd)
unit=$(realpath "${1:-$here/attention-d64.cu}")
filter=${2:-}
tk=${MEGAPATCH_CUDATK:-/tmp/megapatch-cudatk12}
export NVDISASM="$tk/usr/bin/nvdisasm"

if [ ! -x "$NVDISASM" ]; then
  echo "== fetching CUDA 12.4's nvdisasm (Debian trixie non-free, nvidia-cuda-toolkit) into $tk"
  apt=$(mktemp -d)
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
  echo "deb http://deb.debian.org/debian trixie non-free" > "$apt/sources.list"
  opts=(-o "Dir::Etc::sourcelist=$apt/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$apt/lists"
    -o "Dir::Cache=$apt/cache" -o Debug::NoLocking=1)
  apt-get "${opts[@]}" update > /dev/null
  (cd "$apt" && apt-get "${opts[@]}" download nvidia-cuda-toolkit > /dev/null 2>&1)
  mkdir -p "$tk"
  dpkg -x "$apt"/nvidia-cuda-toolkit_*.deb "$tk"
  rm -rf "$apt"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
compile() {  # $1: include dir, $2: cubin; prints each kernel's registers and spills
  if ! nvcc -std=c++17 -arch=sm_90a -DMEGAPATCH_CUDA_WGMMA=1 -O3 --expt-relaxed-constexpr -cubin -o "$2" "$1/unit.cu" \
    -I"$1" -Xptxas -v > "$2.log" 2>&1; then
    grep -v "ptxas info" "$2.log" | head -40 >&2
    echo "tools/sass: nvcc failed on $1/unit.cu" >&2
    exit 1
  fi
  awk '/Compiling entry function/ { match($0, /_Z[A-Za-z0-9_]+/); name = substr($0, RSTART, RLENGTH) }
         /spill stores/ { sub(/^ +/, ""); spill = $0 }
         /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); print substr($0, RSTART, RLENGTH) ", " spill ": " name }' "$2.log" |
    c++filt | sed -E 's/mpc::att::|mpc::|\(Params\)//g'
}
mkdir -p "$work/as-is" "$work/hot"
cp "$kernels"/*.cuh "$kernels"/*.h "$work/as-is/"
cp "$kernels"/*.cuh "$kernels"/*.h "$work/hot/"
cp "$unit" "$work/as-is/unit.cu"
cp "$unit" "$work/hot/unit.cu"
python3 "$here/hot-paths.py" "$kernels/attention_impl.cuh" "$work/hot/attention_impl.cuh"

echo "== as compiled (ptxas: registers, spills; then the loops)"
compile "$work/as-is" "$work/as-is.cubin" | grep -F -- "$filter" || true
SASS_DUMP= python3 "$here/sass-loops.py" "$work/as-is.cubin" "$filter"
echo "== fast paths forced (a main loop's count: its cost for one whole tile)"
compile "$work/hot" "$work/hot.cubin" > /dev/null
python3 "$here/sass-loops.py" "$work/hot.cubin" "$filter"
