#!/usr/bin/env bash
# Compiles @megapatch/cuda's sources here as the GPU machine's build will, before a device call
# spends its minutes on it: the host C++ files with g++ against the CUDA toolkit's headers, the
# kernel files with nvcc for sm_90a plus compute_90 PTX (CMakeLists.txt's architectures), nothing
# linked. It needs nvcc (CUDACXX or PATH); without one it says so and exits 0. The files that need
# headers this machine lacks (cublasLt.h) are named and skipped.
# (Session 33's run on an H100 stopped at its build: a device helper in common.cuh called atomicAdd,
# which g++ does not know when it reads that header for the launchers. The emulator build, the only
# one a machine without cuBLAS makes, compiles everything as host code with atomicAdd defined.)
#   bash packages/cuda/gpu/preflight.sh            everything (766 s on 2 cores)
#   MEGAPATCH_PREFLIGHT=quick bash ...             the host files and the kernels but attention's
#                                                  (333 s on 2 cores, elementwise.cu 258 of them)
#   MEGAPATCH_PREFLIGHT=host bash ...              the host files only (seconds; prepare.sh's default)
# Jobs: MEGAPATCH_PREFLIGHT_JOBS (nproc). Exit status 1 when a file fails to compile.
# cuBLAS's headers (for gemm.cu) come from the wheel the GPU machine uses:
#   pip download nvidia-cublas --no-deps -d /tmp/whl   (then unzip it into /tmp/cu13)
#   CPATH=/tmp/cu13/nvidia/cu13/include bash packages/cuda/gpu/preflight.sh
# MEGAPATCH_PREFLIGHT_KEEP=FILE keeps the list of commands there.
set -uo pipefail
pkg=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$pkg"
mode=${MEGAPATCH_PREFLIGHT:-full}
jobs=${MEGAPATCH_PREFLIGHT_JOBS:-$(nproc)}
nvcc=${CUDACXX:-$(command -v nvcc || true)}
if [ -z "$nvcc" ]; then
  echo "preflight: no nvcc here (CUDACXX or PATH): nothing compiled as the GPU build does"
  exit 0
fi
cuda_inc=$(cd "$(dirname "$(readlink -f "$nvcc")")/../include" 2>/dev/null && pwd)
[ -f "$cuda_inc/cuda_runtime.h" ] || cuda_inc=/usr/local/cuda/include
if [ ! -f "$cuda_inc/cuda_runtime.h" ]; then
  echo "preflight: no cuda_runtime.h beside $nvcc or in /usr/local/cuda/include" >&2
  exit 1
fi
napi=$(node -p "require('node-addon-api').include" | tr -d '"')
napi_h=$(dirname "$(node -p "require.resolve('node-api-headers/package.json')")")/include
version=$("$nvcc" --version | grep -o 'release [0-9.]*' | cut -d' ' -f2)
# what the header search finds on CPATH too (the wheels' folders on the GPU machine)
have() { # header
  local d
  for d in ${CPATH:+${CPATH//:/ }} "$cuda_inc" /usr/include; do [ -f "$d/$1" ] && return 0; done
  return 1
}
defs=(-DMEGAPATCH_WITH_CUDA=1 -DMEGAPATCH_CUDA_WGMMA=1
  -DNAPI_VERSION=8 -DNAPI_DISABLE_CPP_EXCEPTIONS -DNODE_ADDON_API_DISABLE_DEPRECATED)
# info.cc's (only the host compiler sees it)
host_defs=(-DMEGAPATCH_CUDA_TOOLKIT="\"$version\"")
incs=(-I"$napi_h" -I"$napi" -Inative/src -Inative/src/kernels)
tmp=$(mktemp -d)
trap '[ -n "${MEGAPATCH_PREFLIGHT_KEEP:-}" ] && cp "$tmp/commands" "$MEGAPATCH_PREFLIGHT_KEEP"; rm -rf "$tmp"' EXIT
skipped=()

host=(native/src/addon.cc native/src/backend/*.cc)
host+=(native/src/info.cc)
kernels=()
for cu in native/src/kernels/*.cu; do
  [ "$mode" = host ] && { skipped+=("$cu (MEGAPATCH_PREFLIGHT=host)"); continue; }
  case $cu in
    */gemm.cu) have cublasLt.h || { skipped+=("$cu (cublasLt.h)"); continue; } ;;
    */attention*.cu) [ "$mode" = quick ] && { skipped+=("$cu (MEGAPATCH_PREFLIGHT=quick)"); continue; } ;;
  esac
  kernels+=("$cu")
done

# one command a line: "name<TAB>command"; xargs runs them $jobs at a time, each logs to $tmp
cmdline() { # name command...
  local name=$1
  shift
  printf '%s\t' "$name"
  printf '%q ' "$@"
  echo
}
{
  for f in "${host[@]}"; do
    cmdline "$f" g++ -std=gnu++17 -fsyntax-only -Wall "${defs[@]}" "${host_defs[@]}" "${incs[@]}" -isystem "$cuda_inc" \
      -isystem "$cuda_inc/cccl" "$f"
  done
  # the longest first (the attention kernels), so that the rest fill the other jobs beside them
  for f in $( ((${#kernels[@]})) && ls -S "${kernels[@]}"); do
    cmdline "$f" "$nvcc" -std=c++17 --expt-relaxed-constexpr -O3 "${defs[@]}" "${incs[@]}" \
      --generate-code=arch=compute_90a,code=sm_90a --generate-code=arch=compute_90,code=compute_90 -c "$f" \
      -o "$tmp/$(basename "$f").o"
  done
} >"$tmp/commands"
echo "preflight: $(wc -l <"$tmp/commands") files with CUDA $version ($nvcc), $jobs at a time ($mode)"
t0=$(date +%s)
# shellcheck disable=SC2016
tr '\n' '\0' <"$tmp/commands" | xargs -0 -P "$jobs" -I{} bash -c '
  line=$1; name=${line%%$'"'"'\t'"'"'*}; cmd=${line#*$'"'"'\t'"'"'}
  s=$(date +%s); log=$0/$(echo "$name" | tr / _).log
  if eval "$cmd" >"$log" 2>&1; then echo "ok    $(($(date +%s) - s))s $name"; else echo "FAIL  $(($(date +%s) - s))s $name"; echo "$name" >>$0/failed; fi
' "$tmp" {}
# The build's configure (cmake-js, as the GPU build runs it), then again in the same folder as
# after a changed CMakeLists.txt: both must generate sm_90a + compute_90 (a reconfigure once fell
# back to the sm_75 CMake had cached). Needs cuBLAS found (headers on CPATH, the library beside them
# or on LIBRARY_PATH), else it is skipped.
if have cublasLt.h; then
  cfg=$tmp/configure
  s=$(date +%s)
  archs=
  if MEGAPATCH_NO_CUDA_EMULATOR=1 npx cmake-js configure --out "$cfg" >"$tmp/configure.log" 2>&1; then
    first=$(grep -o -- '--generate-code=[^ ]*' "$cfg/build.ninja" | sort -u | tr '\n' ' ')
    (cd "$cfg" && MEGAPATCH_NO_CUDA_EMULATOR=1 cmake . >>"$tmp/configure.log" 2>&1) &&
      archs=$(grep -o -- '--generate-code=[^ ]*' "$cfg/build.ninja" | sort -u | tr '\n' ' ')
  fi
  if [[ $first == *sm_90a* && $first == *compute_90\]* && $archs == "$first" ]]; then
    echo "ok    $(($(date +%s) - s))s configure, twice: $archs"
  else
    echo "FAIL  $(($(date +%s) - s))s configure, twice: first ${first:-?}, then ${archs:-?}"
    echo "configure" >>"$tmp/failed"
  fi
else
  skipped+=("the configure (cuBLAS's headers not found)")
fi
for s in "${skipped[@]}"; do echo "skip  $s"; done
# ptxas's C7513: a kernel's wgmma serialised (a register that a wgmma reads written while a group is
# in flight; the grouped GEMM's first wgmma form had it): not an error, but its pipelining is lost
grep -l 'C7513' "$tmp"/*.log 2>/dev/null | while read -r log; do
  echo "warn  $(basename "$log" .log): ptxas C7513, wgmma serialised in $(grep -c C7513 "$log") kernels:"
  grep -o "function '[^']*'" "$log" | head -3 | sed 's/^/        /'
done
if [ -f "$tmp/failed" ]; then
  while read -r f; do
    echo "--- $f:"
    log=$tmp/$(echo "$f" | tr / _).log
    { grep -E 'error|Error' "$log" || tail -5 "$log"; } | head -10
  done <"$tmp/failed"
  echo "preflight: $(wc -l <"$tmp/failed") failed ($(tr '\n' ' ' <"$tmp/failed"); of $(wc -l <"$tmp/commands") files and the configure; $(($(date +%s) - t0)) s)" >&2
  exit 1
fi
echo "preflight: all $(wc -l <"$tmp/commands") files compiled ($(($(date +%s) - t0)) s)"
