#!/usr/bin/env bash
# Run here (a machine with the pnpm install), before a device call: fills .gpu/ (ignored by git) at
# the repository root with what packages/cuda/gpu/run.sh needs on the GPU machine, which has no
# Node.js and no registry:
#   .gpu/node.xz, .gpu/setup.sh   from ../shared/gpu/prepare.sh (node; CUDA wheels on CPATH etc.)
#   .gpu/node_modules.tar.xz      the node_modules that building the addons of packages/tensor and
#                                 packages/cuda and running vitest, tsx and esbuild there need
#                                 (gpu/closure.mjs lists them; pnpm's links are kept as links)
# Then: device run with carry [".gpu"], command `source .gpu/setup.sh && bash packages/cuda/gpu/run.sh`.
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$root"
here=packages/cuda/gpu

# first, the sources compiled as the GPU machine's build does (gpu/preflight.sh; the host files by
# default, MEGAPATCH_PREFLIGHT=quick|full for the kernels too, =0 to skip): a compile error found
# there costs a device call
if [ "${MEGAPATCH_PREFLIGHT:-host}" != 0 ]; then
  MEGAPATCH_PREFLIGHT=${MEGAPATCH_PREFLIGHT:-host} bash "$here/preflight.sh" || {
    echo "prepare: packages/cuda does not compile as the GPU build will (above); fix it first" >&2
    exit 1
  }
fi

shared=$(cd "$root/.." && pwd)/shared/gpu/prepare.sh
if [ -f "$shared" ]; then
  bash "$shared"
else
  echo "prepare: $shared not found: .gpu/node.xz and .gpu/setup.sh come from it" >&2
  mkdir -p .gpu
fi
[ -f .gpu/node.xz ] || echo "prepare: WARNING: no .gpu/node.xz (the GPU machine has no node)" >&2
[ -f .gpu/setup.sh ] || echo "prepare: WARNING: no .gpu/setup.sh" >&2

for p in node_modules/.pnpm node_modules/vitest packages/cuda/node_modules/cmake-js packages/tensor/node_modules/cmake-js; do
  [ -e "$p" ] || { echo "prepare: $p is missing: run the pnpm install first" >&2; exit 1; }
done
list=$(mktemp)
trap 'rm -f "$list" .gpu/node_modules.tar.xz.tmp' EXIT
# the training-step bench (bench/ours.mts through packages/train's sources) also needs these
export EXTRA_ROOTS="${EXTRA_ROOTS:-packages/train/node_modules/yaml packages/data/node_modules/@huggingface/jinja packages/data/node_modules/@huggingface/tokenizers packages/data/node_modules/hyparquet}"
node "$here/closure.mjs" "$root" > "$list"
# an esbuild binary for this platform must be in it (vite, tsx and the tensor dist build use it)
grep -q '^node_modules/.pnpm/@esbuild+linux-x64@' "$list" || { echo "prepare: no @esbuild/linux-x64 in the closure" >&2; exit 1; }
n=$(grep -c '^node_modules/.pnpm/[^/]*$' "$list")
raw=$(grep '^node_modules/.pnpm/[^/]*$' "$list" | xargs du -sk | awk '{s+=$1} END {print int(s/1024)}')
echo "prepare: $n packages, ${raw} MiB unpacked"
tar -cf - --owner=0 --group=0 -T "$list" | xz -T"${XZ_THREADS:-2}" -6 > .gpu/node_modules.tar.xz.tmp
mv .gpu/node_modules.tar.xz.tmp .gpu/node_modules.tar.xz
ls -l .gpu
total=$(du -sk .gpu | awk '{print $1}')
echo "prepare: .gpu is $((total / 1024)) MiB (with the working tree, at most 64 MiB travel)"
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print int(s/1024)}')
echo "prepare: the working tree (tracked + untracked, not ignored) is $((tree / 1024)) MiB; together $(((total + tree) / 1024)) MiB"
if [ $((total + tree)) -gt $((60 * 1024)) ]; then
  echo "prepare: over 60 MiB: the device call may refuse it" >&2
  exit 1
fi
echo 'prepare: now run on the device, with carry [".gpu"] and timeout_s 600:'
echo '  source .gpu/setup.sh && bash packages/cuda/gpu/run.sh'
