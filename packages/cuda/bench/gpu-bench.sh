#!/usr/bin/env bash
# The GPU bench of @megapatch/cuda (issue 13), megapatch and PyTorch measured in the same run:
#   bf16 GEMM vs torch.matmul (target ≥ 0.95), the step's memory-bound kernels vs a torch copy's GB/s, MoE's grouped GEMM (cuBLAS's, and one GEMM per
#   expert) vs torch's loop of matmuls and torch._grouped_mm, causal flash attention forward+backward vs torch's
#   SDPA flash kernel (target torch time / ours ≥ 1.0), and a Llama-style ~1B bf16 training step
#   through @megapatch/train: MFU (peak: the H200's dense bf16 989 TFLOP/s; goal ≥ 0.50) and
#   tokens/s vs the same model in PyTorch, eager and torch.compile.
# Each piece runs in its own process under a timeout cut from one overall budget, so a hang or a
# crash costs its piece only; the table (the last lines printed) is made from whatever finished.
#
# usage (repository root, node on PATH, node_modules in place): bash packages/cuda/bench/gpu-bench.sh
# env:
#   OUT                          folder for bench.jsonl (one JSON line per case) and bench.log
#   MEGAPATCH_BENCH_BUDGET_S     overall seconds (default 270)
#   MEGAPATCH_BENCH_DEVICE       cuda:0 (default) | cudaemu:0 (rehearsal: the emulator; torch on the CPU)
#   MEGAPATCH_BENCH_TINY=1       the tiny cases of cases.json (rehearsal)
#   MEGAPATCH_BENCH_PARTS        subset of "gemm grouped attn stream train torch-train compile" (default all),
#                                and the opt-in "moe-train torch-moe-train" (a Mixtral-style MoE step)
#                                and "generate torch-generate" (decoding with the KV cache, vs HF generate)
#   MEGAPATCH_BENCH_MBS          training micro-batch (default cases.json's; halved once on a failure)
#   MEGAPATCH_BENCH_TRAIN_VARIANTS  the training step again per "name:VAR=value[,VAR=value]"
#                                (default: the attention on wgmma with one and two warpgroups a
#                                block and warp-specialised, the norm backward split, dQ on the
#                                caller's stream, capped dQ registers, no gradient-accumulation
#                                fusion, autotuned GEMMs; "" for none)
#   MEGAPATCH_BENCH_WGMMA=0       leave out the wgmma variants (gpu/run.sh: when its wgmma checks failed)
#   MEGAPATCH_BENCH_WGMMA_WS=0    leave out the warp-specialised ones (gpu/run.sh: when their check failed)
#   MEGAPATCH_BENCH_PYTHON       the python with torch (default: python3, else /opt/torch/.venv/bin/python3)
set -u
cd "$(dirname "$0")/../../.." || exit 1
ROOT=$(pwd)
BENCH=packages/cuda/bench
OUT=${OUT:-$(mktemp -d /tmp/mp-gpu-bench-XXXXXX)}
mkdir -p "$OUT"
JSONL=$OUT/bench.jsonl
LOG=$OUT/bench.log
: >"$JSONL"
# under gpu/run.sh, stdout and stderr already go to $OUT/bench.log: then the log is not written twice
SAME=false
if [ "$(readlink -f /proc/$$/fd/1 2>/dev/null)" = "$(readlink -f "$LOG")" ]; then SAME=true; else : >"$LOG"; fi
# tolog: stdin to stderr, and to the log unless stderr is the log already
tolog() { if $SAME; then cat >&2; else tee -a "$LOG" >&2; fi; }
BUDGET=${MEGAPATCH_BENCH_BUDGET_S:-270}
PARTS=${MEGAPATCH_BENCH_PARTS:-gemm grouped attn stream train torch-train compile}
export MEGAPATCH_BENCH_DEVICE=${MEGAPATCH_BENCH_DEVICE:-cuda:0}
START=$(date +%s)
has() { [[ " $PARTS " == *" $1 "* ]]; }
say() { echo "[gpu-bench] $*" | tolog; }

TSX=
for t in packages/cuda/node_modules/.bin/tsx node_modules/.bin/tsx; do
  [ -x "$t" ] && { TSX=$t; break; }
done
PY=${MEGAPATCH_BENCH_PYTHON:-}
if [ -z "$PY" ]; then
  for p in python3 /opt/torch/.venv/bin/python3 /usr/bin/python3; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import torch' >/dev/null 2>&1; then PY=$p; break; fi
  done
fi
TORCH_ARGS=()
[ "${MEGAPATCH_BENCH_TINY:-}" = 1 ] && TORCH_ARGS+=(--tiny)
[[ "$MEGAPATCH_BENCH_DEVICE" == cudaemu* ]] && TORCH_ARGS+=(--device cpu)

say "out: $OUT; device $MEGAPATCH_BENCH_DEVICE; tiny ${MEGAPATCH_BENCH_TINY:-0}; budget ${BUDGET}s; parts: $PARTS"
say "tsx: ${TSX:-MISSING}; python: ${PY:-no python with torch}; node $(node --version 2>&1)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit --format=csv 2>&1 | tolog
fi

# run NAME CAP CMD...: CMD under min(CAP, what is left of the budget less a reserve for the rest);
# its JSON lines go to bench.jsonl, everything to bench.log
run() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  local t=$((cap < left ? cap : left))
  if [ "$t" -lt 10 ]; then
    say "$name: skipped (budget spent)"
    echo "{\"side\":\"bench\",\"kind\":\"skipped\",\"case\":\"$name\",\"error\":\"budget spent\"}" >>"$JSONL"
    return 124
  fi
  say "$name: start (timeout ${t}s)"
  local s0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" 2> >(tolog) | while IFS= read -r line; do
    if $SAME; then echo "$line"; else echo "$line" >>"$LOG"; fi
    case "$line" in {*) echo "$line" >>"$JSONL" ;; esac
  done
  local rc=${PIPESTATUS[0]}
  say "$name: exit $rc after $(($(date +%s) - s0))s"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "{\"side\":\"bench\",\"kind\":\"timeout\",\"case\":\"$name\",\"error\":\"timed out after ${t}s\"}" >>"$JSONL"
  fi
  return "$rc"
}

if [ -n "$TSX" ]; then
  has gemm && run ours-gemm 60 "$TSX" $BENCH/ours.mts gemm
fi
if [ -n "$PY" ] && { has gemm || has attn || has stream; }; then
  P=()
  has gemm && P+=(gemm)
  has attn && P+=(attn)
  has stream && P+=(stream)
  run torch-gemm-attn 90 "$PY" $BENCH/torch_ref.py "${P[@]}" ${TORCH_ARGS[@]+"${TORCH_ARGS[@]}"}
fi
if [ -n "$TSX" ]; then
  has attn && run ours-attn 90 "$TSX" $BENCH/ours.mts attn
  has stream && run ours-stream 40 "$TSX" $BENCH/ours.mts stream
  if has train; then
    run ours-train 150 "$TSX" $BENCH/ours.mts train
    rc=$?
    if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 137 ]; then
      # out of memory, most likely: once more at half the micro-batch
      MBS=$(node -e "const c=require('./$BENCH/cases.json')[process.env.MEGAPATCH_BENCH_TINY==='1'?'tiny':'full'].train;console.log(Math.max(1,Math.floor(Number(process.env.MEGAPATCH_BENCH_MBS||c.microBatchSize)/2)))")
      say "ours-train failed: again with micro-batch $MBS"
      MEGAPATCH_BENCH_MBS=$MBS run ours-train-mbs$MBS 120 "$TSX" $BENCH/ours.mts train && export MEGAPATCH_BENCH_MBS=$MBS
    fi
  fi
else
  say "no tsx: the megapatch side cannot run (node_modules missing?)"
fi
if [ -n "$PY" ]; then
  has torch-train && MEGAPATCH_BENCH_TORCH_MODES=eager run torch-train-eager 60 "$PY" $BENCH/torch_ref.py train ${TORCH_ARGS[@]+"${TORCH_ARGS[@]}"}
  has compile && MEGAPATCH_BENCH_TORCH_MODES=compile run torch-train-compile 200 "$PY" $BENCH/torch_ref.py train ${TORCH_ARGS[@]+"${TORCH_ARGS[@]}"}
else
  say "no python with torch: the PyTorch side cannot run"
fi
# the MoE step (opt-in parts): ours, then PyTorch eager's loop over the experts
if [ -n "$TSX" ] && has moe-train; then
  run ours-moe-train 150 "$TSX" $BENCH/ours.mts moe-train
  # again with the grouped GEMMs on our tensor-core kernel, which takes the tokens per expert where
  # the router counted them: no wait a MoE layer and micro-batch (the default loop reads them)
  MEGAPATCH_GROUPED_GEMM=mma MEGAPATCH_BENCH_VARIANT_ENV=MEGAPATCH_GROUPED_GEMM=mma MEGAPATCH_BENCH_MODE=megapatch-mma \
    run ours-moe-train-mma 120 "$TSX" $BENCH/ours.mts moe-train
  # and dropping at capacity 1, padded to it (Megatron's drop-and-pad): every expert's size follows
  # from the tokens, so the default loop of GEMMs waits for nothing either (the experts' work is
  # T·k rows as dropless, spread evenly; the loss differs, as dropped tokens do)
  MEGAPATCH_BENCH_MOE_CAPACITY=1 MEGAPATCH_BENCH_VARIANT_ENV="capacity factor 1, padded" MEGAPATCH_BENCH_MODE=megapatch-pad \
    run ours-moe-train-pad 120 "$TSX" $BENCH/ours.mts moe-train
fi
if [ -n "$PY" ] && has torch-moe-train; then
  MEGAPATCH_BENCH_TORCH_MODES=eager run torch-moe-train 90 "$PY" $BENCH/torch_ref.py moe-train ${TORCH_ARGS[@]+"${TORCH_ARGS[@]}"}
fi
# decoding speed (opt-in parts): ours, then Hugging Face's generate
if [ -n "$TSX" ] && has generate; then run ours-generate 90 "$TSX" $BENCH/ours.mts generate; fi
if [ -n "$PY" ] && has torch-generate; then run torch-generate 90 "$PY" $BENCH/torch_ref.py generate ${TORCH_ARGS[@]+"${TORCH_ARGS[@]}"}; fi
# the training step again under kernel variants (information: which default to take), each
# "name:VAR=value[,VAR=value...]" of MEGAPATCH_BENCH_TRAIN_VARIANTS (the runs of 2026-12-04 settled
# fused: slower; run d: dK/dV tiles of 32 queries slower too, capped attention registers faster:
# the attn part still times uncapped)
if [ -n "$TSX" ] && has train; then
  for variant in ${MEGAPATCH_BENCH_TRAIN_VARIANTS-wgmma:MEGAPATCH_ATTENTION_WGMMA=1,MEGAPATCH_ATTENTION_WGMMA_BWD=1 wgmma2:MEGAPATCH_ATTENTION_WGMMA=1,MEGAPATCH_ATTENTION_FWD_ROWS=128,MEGAPATCH_ATTENTION_WGMMA_BWD=2 wgmmaws:MEGAPATCH_ATTENTION_WGMMA=64,MEGAPATCH_ATTENTION_WGMMA_WS=1,MEGAPATCH_ATTENTION_WGMMA_BWD=ws normsplit:MEGAPATCH_NORM_BWD_FUSED=0 onestream:MEGAPATCH_ATTENTION_BWD_STREAMS=1 dqocc:MEGAPATCH_ATTENTION_DQ_OCC=1 nogaf:MEGAPATCH_BENCH_NO_GAF=1 autotune:MEGAPATCH_GEMM_AUTOTUNE=1}; do
    vname=${variant%%:*}
    venv=${variant#*:}
    # the wgmma forms only where gpu/run.sh's checks passed (MEGAPATCH_BENCH_WGMMA=0 otherwise)
    if [[ $venv == *WGMMA* ]] && [ "${MEGAPATCH_BENCH_WGMMA:-1}" = 0 ]; then
      say "ours-train-$vname: skipped (the wgmma checks did not pass)"
      continue
    fi
    if [[ $venv == *WGMMA_WS* || $venv == *WGMMA_BWD=ws* ]] && [ "${MEGAPATCH_BENCH_WGMMA_WS:-1}" = 0 ]; then
      say "ours-train-$vname: skipped (the warp-specialised check did not pass)"
      continue
    fi
    IFS=, read -r -a vassign <<< "$venv"
    run ours-train-$vname 90 env "${vassign[@]}" MEGAPATCH_BENCH_VARIANT_ENV="$venv" MEGAPATCH_BENCH_MODE=megapatch-$vname \
      MEGAPATCH_BENCH_PROFILE=0 "$TSX" $BENCH/ours.mts train
  done
fi
# the grouped GEMM last (information beyond the issue's targets): what the budget leaves, 2 s a case
if has grouped; then
  export MEGAPATCH_BENCH_CASE_BUDGET_S=${MEGAPATCH_BENCH_GROUPED_CASE_S:-2}
  if [ -n "$TSX" ]; then
    # each MEGAPATCH_GROUPED_GEMM mode the GPU has: the loop (its default), the loop over streams,
    # cuBLAS's grouped GEMM, our tensor-core grouped kernel on mma.sync and on wgmma (tiles of 128 x
    # 128, and of 128 x 256: wgmma256)
    for mode in loop streams grouped mma wgmma wgmma256; do
      # (gpu/run.sh: not where its check or the wgmma self-test failed)
      [ "${mode#wgmma}" != "$mode" ] && [ "${MEGAPATCH_BENCH_GROUPED_WGMMA:-1}" = 0 -o "${MEGAPATCH_BENCH_WGMMA:-1}" = 0 ] && continue
      n=128
      [ "$mode" = wgmma256 ] && n=256
      MEGAPATCH_GROUPED_GEMM=${mode%256} MEGAPATCH_GROUPED_WGMMA_N=$n MEGAPATCH_BENCH_GROUPED_MODE=$mode \
        run ours-grouped-$mode 30 "$TSX" $BENCH/ours.mts grouped
    done
  fi
  [ -n "$PY" ] && run torch-grouped 40 "$PY" $BENCH/torch_ref.py grouped ${TORCH_ARGS[@]+"${TORCH_ARGS[@]}"}
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | tolog
fi
say "total $(($(date +%s) - START))s; $(wc -l <"$JSONL") JSON lines in $JSONL"
if $SAME; then node $BENCH/table.mjs "$JSONL"; else node $BENCH/table.mjs "$JSONL" | tee -a "$LOG"; fi
