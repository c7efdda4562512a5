#!/usr/bin/env bash
# Installs what megapatch needs on a fresh Debian/Ubuntu machine that has Node.js >= 20.19: the
# system packages of the native builds (cmake, g++, OpenBLAS, Gloo, and oneDNN where the distribution
# has it), pnpm, and the workspace's packages.
# Works as root (no sudo needed) and as a user with sudo. CI (.ci/run) runs it too.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v node >/dev/null 2>&1; then
  echo "setup: Node.js is not installed; install Node.js 20.19 or newer first (https://nodejs.org)" >&2
  exit 1
fi
if ! node -e 'const [a,b]=process.versions.node.split(".").map(Number);process.exit(a>20||(a===20&&b>=19)?0:1)'; then
  echo "setup: Node.js $(node -v) is too old; megapatch needs 20.19 or newer" >&2
  exit 1
fi

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || need+=(g++)
dpkg -s libopenblas-dev >/dev/null 2>&1 || need+=(libopenblas-dev)
# Gloo: the collectives engine of @megapatch/parallel (CPU process groups)
dpkg -s libgloo-dev >/dev/null 2>&1 || need+=(libgloo-dev)
# oneDNN: bfloat16 GEMM of @megapatch/tensor on AVX512-BF16/AMX CPUs. Optional: where the
# distribution lacks it the addon builds without it and bf16 GEMMs go through fp32.
optional=()
dpkg -s libdnnl-dev >/dev/null 2>&1 || optional+=(libdnnl-dev)
# A font for the text of the run report's PNG charts (they are drawn without text otherwise).
dpkg -s fonts-dejavu-core >/dev/null 2>&1 || optional+=(fonts-dejavu-core)
# Chromium: the run-report test opens the page in a headless browser (skipped without it). A large
# package, so only CI (CI=true) or MEGAPATCH_WITH_BROWSER=1 installs it.
if [ "${CI:-}" = "true" ] || [ "${MEGAPATCH_WITH_BROWSER:-}" = "1" ]; then
  command -v chromium >/dev/null 2>&1 || optional+=(chromium)
fi
if [ "${#need[@]}" -gt 0 ] || [ "${#optional[@]}" -gt 0 ]; then
  as_root apt-get update -qq
fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  as_root apt-get install -y -qq "${need[@]}" >/dev/null
fi
for pkg in "${optional[@]}"; do
  echo "setup: installing $pkg (optional)"
  as_root apt-get install -y -qq "$pkg" >/dev/null 2>&1 || echo "setup: $pkg is not available here; building without it" >&2
done

if ! command -v pnpm >/dev/null 2>&1; then
  echo "setup: installing pnpm"
  # corepack's signature check fails on some registries; npm installs pnpm directly.
  if [ -w "$(npm prefix -g)/lib" ] || [ -w "$(npm prefix -g)" ]; then npm i -g pnpm >/dev/null; else as_root npm i -g pnpm >/dev/null; fi
fi

pnpm install --frozen-lockfile
