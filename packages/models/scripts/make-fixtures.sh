#!/usr/bin/env bash
# Regenerates test/fixtures/<id>.safetensors for every model of scripts/fixture-models.json:
# writes the F32 HF checkpoints (write-fixture-checkpoints.ts) to a temporary folder, runs the
# PyTorch reference (reference.py, with its self-checks) on them, removes the folder.
# Needs a built @megapatch/convert (cd packages/convert && pnpm build) and Debian python3-torch.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PKG="$(dirname "$HERE")"
PYTHON="${PYTHON:-/usr/bin/python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

cd "$PKG"
./node_modules/.bin/tsx scripts/write-fixture-checkpoints.ts "$TMP"
"$PYTHON" scripts/reference.py "$TMP" test/fixtures "$@"
