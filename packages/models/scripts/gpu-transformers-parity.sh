#!/usr/bin/env bash
# On the GPU machine (after `source .gpu/setup.sh`; transformers is installed there, not here):
# writes the fixture models' F32 checkpoints from the TypeScript sources (the bench's resolve hook:
# no dist build) and checks test/fixtures/*.safetensors, which scripts/reference.py computed,
# against transformers' own forward and backward (scripts/transformers_parity.py).
# Output: $OUT/transformers_parity.json (OUT defaults to /tmp/megapatch-parity), one line a model
# on stdout. Here, without transformers, MEGAPATCH_PARITY_ENGINE=reference checks the harness
# against reference.py.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$root"
out=${OUT:-/tmp/megapatch-parity}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
hook="data:text/javascript,import {register} from 'node:module'; register('file://$root/packages/cuda/bench/src-resolve.mjs')"
packages/cuda/node_modules/.bin/tsx --import "$hook" packages/models/scripts/write-fixture-checkpoints.ts "$tmp" >/dev/null
engine=()
[ "${MEGAPATCH_PARITY_ENGINE:-transformers}" = reference ] && engine=(--engine=reference)
"${PYTHON:-python3}" packages/models/scripts/transformers_parity.py "$tmp" packages/models/test/fixtures \
  "$out/transformers_parity.json" "${engine[@]}"
