#!/usr/bin/env bash
# Regenerates test/fixtures/gemma.safetensors: writes the synthetic F32 Gemma checkpoint
# (write-checkpoint.ts) to a temporary folder, runs the PyTorch reference (reference.py, with its
# self-checks) on it, removes the folder.
# Needs a built @megapatch/convert (cd packages/convert && pnpm build) and Debian python3-torch.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PKG="$(dirname "$HERE")"
PYTHON="${PYTHON:-/usr/bin/python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

cd "$PKG"
./node_modules/.bin/tsx scripts/write-checkpoint.ts "$TMP/gemma"
"$PYTHON" scripts/reference.py "$TMP/gemma" test/fixtures/gemma.safetensors "$@"
