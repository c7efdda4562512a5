#!/usr/bin/env bash
# Regenerates test/fixtures/train-parity.json: writes the parity checkpoint, corpus and train
# samples (dump-samples.ts) to a temporary folder, runs the PyTorch reference (reference_train.py,
# with its sensitivity self-checks) on them, removes the folder.
# Needs built @megapatch/convert and @megapatch/data (pnpm build in each) and Debian python3-torch.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PKG="$(dirname "$HERE")"
PYTHON="${PYTHON:-/usr/bin/python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

cd "$PKG"
./node_modules/.bin/tsx scripts/dump-samples.ts "$TMP"
"$PYTHON" scripts/reference_train.py "$TMP" test/fixtures/train-parity.json "$@"
