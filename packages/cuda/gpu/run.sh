#!/usr/bin/env bash
# One device call: build, check and bench @megapatch/cuda on the lent GPU machine, logs under $OUT.
#   here:  bash packages/cuda/gpu/prepare.sh     (fills .gpu/: node, setup.sh, node_modules.tar.xz)
#   there: source .gpu/setup.sh && bash packages/cuda/gpu/run.sh     (carry [".gpu"], timeout_s 600)
# Steps: unpack the node_modules; the machine (nvidia-smi, nvcc, the CUDA wheels' cuBLASLt and
# NCCL); build the addons of packages/tensor and packages/cuda (cmake-js, node-api-headers, no
# download) and packages/tensor/dist (esbuild); cudaInfo() and gemmEngine(); gpu/gemm-check.mts;
# the tensor op tests (vitest.conformance.config.ts) and the kernel comparison
# (vitest.kernels.config.ts) on the device; cumsum's chunked integer scan (test/scan-kernels.test.ts)
# and the uploads and batched reads (test/transfers.test.ts)
# and the MoE fixture models against the CPU (gpu/moe-check.mts), decoding against the CPU
# (gpu/gen-check.mts); the tensor-core primitives'
# self-test built by nvcc
# for sm_90a, and the tensor-core attention kernels and their variants (wgmma among them) against
# the CUDA-core ones and the CPU; then
# packages/cuda/bench/gpu-bench.sh when it exists;
# last, Nsight Compute (ncu, when the machine has it) on one attention forward and backward
# (gpu/attn-ncu.mts, both backward modes), appended to kernels.log.
# A failing step is reported and the next one runs; each has a timeout, and all end within
# MEGAPATCH_GPU_BUDGET_S (540 s). The table of steps comes last (it is what the reply's tail shows);
# $OUT gets env.log build.log gemm.log conformance.log kernels.log bench.log summary.txt (7 of the 8
# files that come back; the eighth is left to the bench).
# Settings (environment):
#   MEGAPATCH_TEST_DEVICE      the device under test (cuda:0; cudaemu:0 runs the same on the emulator)
#   MEGAPATCH_GPU_BUDGET_S     the whole run's time (540); MEGAPATCH_GPU_TIMEOUT_SCALE multiplies
#                              each step's own limit (1)
#   MEGAPATCH_GPU_SKIP         steps to leave out, e.g. "conformance kernels"
#   MEGAPATCH_GPU_JOBS         build jobs (nproc); the two addons build side by side from 8 on
#   MEGAPATCH_GPU_EMULATOR=1   build the emulator addon on a cuda:N run too (skipped there: unused)
#   MEGAPATCH_GPU_FORCE=1      run in a checkout that has a pnpm install (it rebuilds packages/*/build)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$root"
START=$(date +%s)
export MEGAPATCH_TEST_DEVICE=${MEGAPATCH_TEST_DEVICE:-cuda:0}
DEVICE=$MEGAPATCH_TEST_DEVICE
BUDGET=${MEGAPATCH_GPU_BUDGET_S:-540}
SCALE=${MEGAPATCH_GPU_TIMEOUT_SCALE:-1}
JOBS=${MEGAPATCH_GPU_JOBS:-$(nproc)}
SKIP=" ${MEGAPATCH_GPU_SKIP:-} "
OUT=${OUT:-$root/.gpu/out}
mkdir -p "$OUT"
export OUT NO_COLOR=1 FORCE_COLOR=0 MEGAPATCH_ROOT=$root
TMP=$(mktemp -d)

if [ -f node_modules/.modules.yaml ] && [ "${MEGAPATCH_GPU_FORCE:-0}" != 1 ]; then
  echo "run.sh: $root has a pnpm install; this script rebuilds packages/tensor/build, packages/cuda/build" \
    "and packages/tensor/dist. Run it in a copy, or set MEGAPATCH_GPU_FORCE=1." >&2
  rm -rf "$TMP"
  exit 2
fi
if ! command -v node >/dev/null && [ -f .gpu/node.xz ]; then # setup.sh does this; in case it was not sourced
  mkdir -p /tmp/node/bin && xz -dc .gpu/node.xz > /tmp/node/bin/node && chmod +x /tmp/node/bin/node
  export PATH=/tmp/node/bin:$PATH
fi

# --- the table ------------------------------------------------------------------------------
ROWS=()
record() { # name status seconds note
  local note=${4//$'\n'/ }
  ROWS+=("$(printf '%-12s %-9s %5ss  %s' "$1" "$2" "$3" "${note:0:200}")")
  echo "--- $1: $2 ($3 s) ${note:0:200}"
}
status_of() { case $1 in 0) echo PASS ;; 124 | 137) echo TIMEOUT ;; *) echo "FAIL($1)" ;; esac; }
# report NAME NOTE: the row of the step just run (step has written it already when it skipped)
report() { [ "$RC" = skip ] || record "$1" "$(status_of "$RC")" "$DT" "$2"; }
# the time a step may take: its own limit (scaled), within what is left of the budget
limit() {
  local t left
  t=$(awk -v c="$1" -v s="$SCALE" 'BEGIN { printf "%d", c * s }')
  left=$((START + BUDGET - $(date +%s) - 15))
  echo $((t < left ? t : left))
}
FAILED_LOGS=()
# the ends of the failed steps' logs, then the table (the reply carries the tail); also when the
# script itself stops early (set -e)
FINISHED=0
finish() {
  FINISHED=1
  local f name log
  for f in "${FAILED_LOGS[@]}"; do
    name=${f%%:*} log=${f#*:}
    echo "~~~ $name failed; the end of $log:"
    grep -av '^=== ' "$OUT/$log" | grep -avE '^\s*$' | tail -8 | cut -c1-200
  done
  {
    echo "megapatch GPU run on ${gpu_name:-?}, device $DEVICE, $(($(date +%s) - START)) s in all (budget $BUDGET s)"
    printf '%-12s %-9s %6s  %s\n' step status time note
    printf '%s\n' "${ROWS[@]}"
    echo "logs: $(cd "$OUT" && ls | tr '\n' ' ')"
  } | tee "$OUT/summary.txt"
}
trap 'ERR_LINE=$LINENO' ERR
trap 'rc=$?; rm -rf "$TMP"; if [ "$FINISHED" = 0 ]; then record run.sh "ABORT" 0 "stopped at line ${ERR_LINE:-?} (rc $rc)"; finish; fi' EXIT
# step NAME LOG LIMIT_S COMMAND...: runs COMMAND (a function is run through bash -c) with a timeout,
# appending to $OUT/LOG; sets RC
step() {
  local name=$1 log=$2 t t0 cmd
  t=$(limit "$3")
  shift 3
  RC=0
  if [[ $SKIP == *" $name "* ]]; then record "$name" SKIP 0 "MEGAPATCH_GPU_SKIP"; RC=skip; return 0; fi
  if [ -n "${NO_ADDON:-}" ] && [[ $NEEDS_ADDON == *" $name "* ]]; then record "$name" SKIP 0 "$NO_ADDON"; RC=skip; return 0; fi
  if ((t < 20)); then record "$name" SKIP 0 "no time left in the budget"; RC=skip; return 0; fi
  echo "=== $name (limit ${t}s) $(date -u +%T)" | tee -a "$OUT/$log"
  t0=$(date +%s)
  if [ "$(type -t "$1")" = function ]; then cmd=(bash -c "$*"); else cmd=("$@"); fi
  timeout -k 15 "$t" "${cmd[@]}" >>"$OUT/$log" 2>&1 || RC=$?
  DT=$(($(date +%s) - t0))
  echo "=== $name: rc $RC, ${DT}s" >>"$OUT/$log"
  [ "$RC" = 0 ] || FAILED_LOGS+=("$name:$log")
}
# the last line of a log that matches a pattern (the step's own section is the end of the log)
last() { grep -aE "$2" "$OUT/$1" 2>/dev/null | tail -1 | sed -E 's/^[[:space:]]+//; s/[[:space:]]+/ /g' || true; }
export -f last

# --- unpack ----------------------------------------------------------------------------------
unpack() {
  if [ -d node_modules/.pnpm ]; then echo "node_modules already here"; return 0; fi
  if command -v xz >/dev/null; then tar -xJf .gpu/node_modules.tar.xz
  else python3 -c "import tarfile; t = tarfile.open('.gpu/node_modules.tar.xz'); t.extractall('.', **({'filter': 'tar'} if hasattr(tarfile, 'tar_filter') else {}))"; fi
  echo "unpacked $(ls node_modules/.pnpm | wc -l) packages"
}
export -f unpack
step unpack env.log 120 unpack
report unpack "$(last env.log 'unpacked|already')"

# --- the machine -----------------------------------------------------------------------------
machine() {
  set +e
  echo "device under test: $MEGAPATCH_TEST_DEVICE; $(nproc) cores; $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
  uname -a
  echo "node $(node --version)"; cmake --version | head -1; echo "ninja $(ninja --version 2>/dev/null || echo none)"
  g++ --version | head -1; nvcc --version | tail -2
  nvidia-smi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  echo "CPATH=$CPATH"; echo "LIBRARY_PATH=$LIBRARY_PATH"; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  local d
  for d in ${CPATH//:/ } /usr/local/cuda/include /usr/include; do
    [ -f "$d/cublas_api.h" ] && echo "cublas_api.h in $d: $(grep -h '#define CUBLAS_VER_M[AI]' "$d/cublas_api.h" | awk '{printf "%s ", $3}')"
    [ -f "$d/nccl.h" ] && echo "nccl.h in $d: $(grep -hE '#define NCCL_(MAJOR|MINOR|PATCH) ' "$d/nccl.h" | awk '{printf "%s ", $3}')"
    # cuBLASLt's grouped GEMM (the MoE lead): what this version's header declares for it
    [ -f "$d/cublasLt.h" ] && grep -nE 'BATCH_MODE|GROUPED|Grouped' "$d/cublasLt.h" | head -20 | sed "s|^|cublasLt.h grouped: |"
  done
  for d in ${LIBRARY_PATH//:/ } /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu; do
    ls -l "$d"/libcublasLt.so* "$d"/libnccl.so* "$d"/libcudart.so* 2>/dev/null
  done
  return 0
}
export -f machine
step machine env.log 60 machine
gpu_name=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
report machine "${gpu_name:-no nvidia-smi}; nvcc $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo none)"

# --- build -----------------------------------------------------------------------------------
# (CMakeLists.txt builds sm_90 + compute_90 PTX unless CUDAARCHS says otherwise; the table shows
# the --generate-code of the build: an sm_75 build would JIT on the GPU, leave out the mma.sync
# attention kernels, and keep cicc on attention.cu for over 10 minutes)
build_tensor() {
  cd packages/tensor && node node_modules/cmake-js/bin/cmake-js build --out build --parallel "$MEGAPATCH_GPU_JOBS_"
}
build_cuda() {
  cd packages/cuda
  case $MEGAPATCH_TEST_DEVICE in
    cudaemu*) ;;
    *) [ "${MEGAPATCH_GPU_EMULATOR:-0}" = 1 ] || export MEGAPATCH_NO_CUDA_EMULATOR=1 ;;
  esac
  local rc=0
  # `build` (configure when needed, then build) rather than the package's `compile`, which after a
  # failed build cleans and builds everything again
  node node_modules/cmake-js/bin/cmake-js build --out build --parallel "$MEGAPATCH_GPU_JOBS_" || rc=$?
  if [ $rc != 0 ] && [[ $MEGAPATCH_TEST_DEVICE == cudaemu* ]]; then
    # on the emulator the CUDA part may fail (a machine with nvcc but no usable cuBLASLt): say so,
    # and build the addon without CUDA so that the emulator is there
    echo "megapatch-gpu: the build failed (rc $rc); again with MEGAPATCH_NO_CUDA=1 for the emulator"
    MEGAPATCH_NO_CUDA="the CUDA build failed on this machine" node node_modules/cmake-js/bin/cmake-js rebuild \
      --out build --parallel "$MEGAPATCH_GPU_JOBS_" || return $?
    return 0
  fi
  [ $rc = 0 ] || return $rc
  echo "megapatch-gpu-code: $(grep -o -- '--generate-code=arch=[^ ]*' build/build.ninja 2>/dev/null | sort -u | sed 's/--generate-code=//' | tr '\n' ' ')"
  if [ -f build/Release/megapatch_cuda.node ]; then
    echo "--- ldd build/Release/megapatch_cuda.node (CUDA libraries)"
    ldd build/Release/megapatch_cuda.node | grep -E 'cublas|cudart|nccl|not found' || true
    readelf -d build/Release/megapatch_cuda.node | grep -E 'NEEDED|RPATH|RUNPATH' || true
  fi
}
export -f build_tensor build_cuda
export MEGAPATCH_GPU_JOBS_=$JOBS
# build.log holds the tensor build, then the CUDA build (side by side with 8 jobs or more)
if ((JOBS >= 8)); then
  t=$(limit 330)
  t0=$(date +%s)
  for p in tensor cuda; do
    (timeout -k 15 "$t" bash -c "build_$p" >"$TMP/$p.log" 2>&1; echo $? >"$TMP/$p.rc"; echo $(($(date +%s) - t0)) >"$TMP/$p.s") &
  done
  wait
  for p in tensor cuda; do
    { echo "=== build-$p (limit ${t}s)"; cat "$TMP/$p.log"; echo "=== build-$p: rc $(cat "$TMP/$p.rc")"; } >>"$OUT/build.log"
  done
  DT=$(cat "$TMP/tensor.s" 2>/dev/null || echo 0)
  RC=$(cat "$TMP/tensor.rc" 2>/dev/null || echo 99); [ "$RC" = 0 ] || FAILED_LOGS+=("build-tensor:build.log")
  report build-tensor "$(grep -aE 'megapatch: (GEMM|OpenBLAS|bfloat16|oneDNN)' "$TMP/tensor.log" | head -2 | sed 's/^-- megapatch: //' | tr '\n' ' ')"
  DT=$(cat "$TMP/cuda.s" 2>/dev/null || echo 0)
  RC=$(cat "$TMP/cuda.rc" 2>/dev/null || echo 99); [ "$RC" = 0 ] || FAILED_LOGS+=("build-cuda:build.log")
  CUDA_LOG=$TMP/cuda.log
else
  step build-tensor build.log 330 build_tensor
  report build-tensor "$(grep -aE 'megapatch: (GEMM|OpenBLAS|bfloat16|oneDNN)' "$OUT/build.log" | tail -2 | sed 's/^-- megapatch: //' | tr '\n' ' ')"
  cp "$OUT/build.log" "$TMP/before.log"
  step build-cuda build.log 330 build_cuda
  tail -n +"$(($(wc -l <"$TMP/before.log") + 1))" "$OUT/build.log" >"$TMP/cuda.log"
  CUDA_LOG=$TMP/cuda.log
fi
cuda_note=$(grep -aE 'megapatch: (CUDA [0-9]|building @megapatch/cuda without CUDA)|megapatch-gpu:' "$CUDA_LOG" | tail -1 | sed -E 's/^-- //' || true)
cublas_note=$(grep -aE 'libcublasLt' "$CUDA_LOG" | grep -a '=>' | tail -1 | sed -E 's/^[[:space:]]+//; s/ \(0x[0-9a-f]+\)//' || true)
code_note=$(grep -a '^megapatch-gpu-code: ' "$CUDA_LOG" | tail -1 | sed 's/^megapatch-gpu-code: //' || true)
if [ "$RC" = 0 ] && grep -aq '^megapatch-gpu: the build failed' "$CUDA_LOG"; then
  record build-cuda NO-CUDA "$DT" "the CUDA part failed (see build.log); the emulator built without it"
else
  report build-cuda "${cuda_note:-?}${code_note:+; $code_note}${cublas_note:+; $cublas_note}"
fi

# without the addon the steps that load it would only fail one after the other (session 33's run on
# an H100 spent its call so): they are skipped, the tensor cores' self-test (nvcc alone) still runs
NEEDS_ADDON=" info gemm grouped grouped-blas grouped-streams grouped-mma grouped-wgmma grouped-wgmma256 conformance kernels scan moe-check gen-check attn-check attn-check-ws nccl bench ncu "
case $DEVICE in
  cudaemu*) addon=packages/cuda/build/Release/megapatch_cuda_emu.node ;;
  *) addon=packages/cuda/build/Release/megapatch_cuda.node ;;
esac
NO_ADDON=
[ -f "$addon" ] || NO_ADDON="no $addon: the build failed (build.log)"

step tensor-dist build.log 60 node packages/cuda/gpu/tensor-dist.mjs
report tensor-dist "$(last build.log '^tensor-dist:' | sed 's/^tensor-dist: //')"

# --- checks ----------------------------------------------------------------------------------
TSX=packages/cuda/node_modules/.bin/tsx
step info env.log 90 "$TSX" packages/cuda/gpu/info-check.mts "$DEVICE"
report info "$(last env.log '^INFO ' | sed -E 's/^INFO (OK|FAIL): //')"

step gemm gemm.log 120 "$TSX" packages/cuda/gpu/gemm-check.mts "$DEVICE"
report gemm "$(last gemm.log '[0-9]+ cases, [0-9]+ failures') $(last gemm.log '^engine:') $(last gemm.log 'TF32 on')"
# the grouped GEMM again on the grouped tiled kernel (the emulator's path), on cuBLAS's grouped
# GEMM and on several streams (the loop of GEMMs, the default, ran above)
step grouped gemm.log 60 env MEGAPATCH_GROUPED_GEMM=tiled "$TSX" packages/cuda/gpu/gemm-check.mts "$DEVICE" grouped
report grouped "$(last gemm.log '^grouped \(MEGAPATCH_GROUPED_GEMM=tiled\)')"
step grouped-blas gemm.log 60 env MEGAPATCH_GROUPED_GEMM=grouped "$TSX" packages/cuda/gpu/gemm-check.mts "$DEVICE" grouped
report grouped-blas "$(last gemm.log '^grouped \(MEGAPATCH_GROUPED_GEMM=grouped\)')"
# and on several streams at once (a missing fork or join would show as wrong products here)
step grouped-streams gemm.log 60 env MEGAPATCH_GROUPED_GEMM=streams "$TSX" packages/cuda/gpu/gemm-check.mts "$DEVICE" grouped
report grouped-streams "$(last gemm.log '^grouped \(MEGAPATCH_GROUPED_GEMM=streams\)')"
# and on our tensor-core grouped kernels (mma.sync, wgmma; all four operand layouts)
step grouped-mma gemm.log 60 env MEGAPATCH_GROUPED_GEMM=mma "$TSX" packages/cuda/gpu/gemm-check.mts "$DEVICE" grouped
report grouped-mma "$(last gemm.log '^grouped \(MEGAPATCH_GROUPED_GEMM=mma\)')"
step grouped-wgmma gemm.log 60 env MEGAPATCH_GROUPED_GEMM=wgmma "$TSX" packages/cuda/gpu/gemm-check.mts "$DEVICE" grouped
report grouped-wgmma "$(last gemm.log '^grouped \(MEGAPATCH_GROUPED_GEMM=wgmma\)')"
GROUPED_WGMMA_RC=$RC
step grouped-wgmma256 gemm.log 60 env MEGAPATCH_GROUPED_GEMM=wgmma MEGAPATCH_GROUPED_WGMMA_N=256 "$TSX" packages/cuda/gpu/gemm-check.mts "$DEVICE" grouped
report grouped-wgmma256 "$(last gemm.log '^grouped \(MEGAPATCH_GROUPED_GEMM=wgmma\)') (128 x 256 tiles)"
# the bench times the wgmma grouped kernel only if it was right here, in both widths (and the
# self-test passed)
export MEGAPATCH_BENCH_GROUPED_WGMMA=$([ "$RC" = 0 ] && [ "$GROUPED_WGMMA_RC" = 0 ] && echo 1 || echo 0)

vitest_run() { # config
  cd packages/cuda && node ../../node_modules/vitest/vitest.mjs run --config "$1"
}
export -f vitest_run
vitest_note() { # log
  echo "$(last "$1" '^ *Test Files ') / $(last "$1" '^ *Tests ') $(last "$1" '^ *Errors ')"
}
step conformance conformance.log 240 vitest_run vitest.conformance.config.ts
report conformance "$(vitest_note conformance.log)"

if [ -f packages/cuda/vitest.kernels.config.ts ]; then
  step kernels kernels.log 150 vitest_run vitest.kernels.config.ts
  report kernels "$(vitest_note kernels.log)"
else
  record kernels SKIP 0 "no packages/cuda/vitest.kernels.config.ts"
fi

# cumsum's chunked integer scan (the MoE routing map's), against the CPU; uploads through the
# page-locked ring behind a long product (copies that really run late) and the queued checks read
# with one wait (test/transfers.test.ts)
scan_check() {
  cd packages/cuda && node ../../node_modules/vitest/vitest.mjs run test/scan-kernels.test.ts test/transfers.test.ts
}
export -f scan_check
step scan kernels.log 60 scan_check
report scan "$(vitest_note kernels.log)"
# MoE fixture models (routing on the device, grouped experts, MLA, MTP) against the CPU
step moe-check kernels.log 90 "$TSX" packages/cuda/gpu/moe-check.mts "$DEVICE"
report moe-check "$(grep -acE '^MOE OK' "$OUT/kernels.log" || true) of 5 MoE cases match the CPU$(last kernels.log '^MOE FAIL' | sed 's/^/; /')"
# decoding with the KV cache (greedy, top-k, temperature, top-p drawn on the device) against the CPU
step gen-check kernels.log 60 "$TSX" packages/cuda/gpu/gen-check.mts "$DEVICE"
report gen-check "$(grep -acE '^GEN OK' "$OUT/kernels.log" || true) of 4 decodings give the CPU's tokens$(last kernels.log '^GEN FAIL' | sed 's/^/; /')"

# --- tensor cores: the primitives' self-test built by nvcc for sm_90a (mma.sync, ldmatrix and
# wgmma layouts against the tensor cores themselves), then the tensor-core attention kernels
# (test/mma.test.ts on the device: every variant, the wgmma forward among them, against the
# CUDA-core kernels and the CPU) ----------------------------------------------------------------
mma_selftest() {
  local exe
  exe=$(mktemp) && nvcc -std=c++17 -arch=sm_90a -O2 --expt-relaxed-constexpr -I packages/cuda/native/src/kernels \
    packages/cuda/native/emu/test/mma_selftest.cu -o "$exe" && "$exe"
  local rc=$?
  rm -f "$exe"
  return $rc
}
export -f mma_selftest
# WGMMA_OK: the wgmma forms are run below (attn-check, the bench) only once the self-test has passed
# on this device, and the bench's only once attn-check has too (a wrong layout gives wrong numbers,
# a fault would end the bench's process with its other cases)
WGMMA_OK=1
if [[ $DEVICE == cuda:* ]]; then
  step mma-selftest kernels.log 90 mma_selftest
  report mma-selftest "$(last kernels.log '^(ok [0-9]+ checks|FAILED)')"
  [ "$RC" = 0 ] || WGMMA_OK=0
else
  record mma-selftest SKIP 0 "not a cuda device (the emulator's self-test runs in mma.test.ts)"
fi
# the warp-specialised kernels (forward, dK/dV, dQ: named barriers between warpgroups, a mistake
# there hangs rather than fails) are left out here and checked after, on one case with a short
# timeout (WS_OK)
attn_check() {
  cd packages/cuda && MEGAPATCH_TEST_WGMMA=$WGMMA_OK MEGAPATCH_TEST_WGMMA_WS=0 \
    node ../../node_modules/vitest/vitest.mjs run test/mma.test.ts -t 'tensor-core attention'
}
attn_check_ws() {
  cd packages/cuda && node ../../node_modules/vitest/vitest.mjs run test/mma.test.ts -t 'causal GQA, S 200'
}
export -f attn_check attn_check_ws
export WGMMA_OK
step attn-check kernels.log 90 attn_check
report attn-check "$(vitest_note kernels.log)$([ "$WGMMA_OK" = 1 ] || echo ' (without the wgmma forms)')"
[ "$RC" = 0 ] || WGMMA_OK=0
WS_OK=$WGMMA_OK
if [ "$WGMMA_OK" = 1 ]; then
  step attn-check-ws kernels.log 40 attn_check_ws
  report attn-check-ws "$(vitest_note kernels.log) (the warp-specialised kernels, one case)"
  [ "$RC" = 0 ] || WS_OK=0
fi
# read by bench/ours.mts and bench/gpu-bench.sh
export MEGAPATCH_BENCH_WGMMA=$WGMMA_OK MEGAPATCH_BENCH_WGMMA_WS=$WS_OK

# --- NCCL: a communicator of one rank (one GPU), libnccl from PyTorch's nvidia-nccl wheel ------
NCCL_LIB_DIR=$(python3 -c 'import nvidia.nccl as n; print(list(n.__path__)[0] + "/lib")' 2>/dev/null || true)
export NCCL_LIB_DIR
nccl_run() {
  cd packages/cuda && LD_LIBRARY_PATH="${NCCL_LIB_DIR:+$NCCL_LIB_DIR:}$LD_LIBRARY_PATH" \
    node ../../node_modules/vitest/vitest.mjs run test/nccl.test.ts
}
export -f nccl_run
step nccl nccl.log 90 nccl_run
report nccl "$(vitest_note nccl.log) (libnccl from ${NCCL_LIB_DIR:-the system})"

# --- bench -----------------------------------------------------------------------------------
# packages/cuda/bench/gpu-bench.sh (its own helper's): runs from the repository root with
# MEGAPATCH_TEST_DEVICE, OUT (it may write ONE file of its own there, beside bench.log) and
# MEGAPATCH_BENCH_BUDGET_S (the seconds it has: what is left of the budget, at most
# MEGAPATCH_GPU_BENCH_S); its last line goes into the table's note.
if [ -f packages/cuda/bench/gpu-bench.sh ]; then
  export MEGAPATCH_BENCH_BUDGET_S=$(limit "${MEGAPATCH_GPU_BENCH_S:-600}")
  step bench bench.log "${MEGAPATCH_GPU_BENCH_S:-600}" bash packages/cuda/bench/gpu-bench.sh
  report bench "$(grep -av "^===" "$OUT/bench.log" 2>/dev/null | tail -1)"
else
  record bench SKIP 0 "no packages/cuda/bench/gpu-bench.sh"
fi
# --- end of bench ----------------------------------------------------------------------------

# --- Nsight Compute on the attention kernels, when ncu is on the machine (into kernels.log) ----
NCU=$(command -v ncu 2>/dev/null || ls -1 /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)
export NCU TSX DEVICE
# the default kernels and two variants the bench compares (the forward and backward on wgmma,
# when their checks above passed; capped dQ registers; uncapped registers were profiled in run d);
# the stall reasons of WarpStateStats need --print-details (older ncu: without it).
# Then the memory-bound kernels of the step (norms, RoPE, SwiGLU, a residual-sized add, the loss: how near
# the DRAM bandwidth each runs), from gpu/stream-ncu.mts.
ncu_run() {
  local variant details=(--print-details all)
  "$NCU" --help 2>/dev/null | grep -q -- '--print-details' || details=()
  local assigns
  for variant in MEGAPATCH_NCU_PASS=default MEGAPATCH_ATTENTION_WGMMA=1,MEGAPATCH_ATTENTION_WGMMA_BWD=1 \
    MEGAPATCH_ATTENTION_DQ_OCC=1; do
    [[ $variant == *WGMMA* && ${MEGAPATCH_BENCH_WGMMA:-1} == 0 ]] && continue
    echo "=== ncu: attention at the model-layer shape, $variant"
    IFS=, read -r -a assigns <<< "$variant"
    env "${assigns[@]}" "$NCU" --target-processes all --kernel-name regex:attn_ "${details[@]}" \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section ComputeWorkloadAnalysis "$TSX" packages/cuda/gpu/attn-ncu.mts "$DEVICE"
  done
  echo "=== ncu: the step's memory-bound kernels (norm, RoPE, SwiGLU, add, cross-entropy) at the 1B shapes"
  "$NCU" --target-processes all --kernel-name 'regex:norm_|rope_|glu_|binary_pack|ce_shard' \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    "$TSX" packages/cuda/gpu/stream-ncu.mts "$DEVICE"
}
export -f ncu_run
if [ -n "$NCU" ] && [[ $DEVICE == cuda* ]]; then
  step ncu kernels.log 180 ncu_run
  report ncu "$(grep -ac '^ *Duration' "$OUT/kernels.log" 2>/dev/null || echo 0) kernel profiles ($NCU)"
else
  record ncu SKIP 0 "no ncu on this machine (or not a cuda device)"
fi

finish
