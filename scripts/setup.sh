#!/usr/bin/env bash
# Install lookalike into ./.venv (idempotent, fast when nothing changed).
#   torch is installed first, pinned, so pip does not pick a build on its own;
#   then the project with the extras in LOOKALIKE_EXTRAS (default: worker,embedded);
#   then Fashion-MNIST from Debian's dataset-fashion-mnist if no copy is found.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=${LOOKALIKE_EXTRAS:-worker,embedded}
TORCH_SPEC=${LOOKALIKE_TORCH:-torch==2.13.0}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else return 1
  fi
}

apt_updated=
apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq || return 1; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@"
}

if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    echo "setup: python3 -m venv failed; installing python3-venv" >&2
    apt_install python3-venv && "$PYTHON" -m venv .venv
  fi
fi

stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-12)-${EXTRAS//,/-}"
if [ ! -f "$stamp" ]; then
  if [[ ",$EXTRAS," == *",worker,"* ]] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --quiet "$TORCH_SPEC"
  fi
  .venv/bin/pip install --quiet -e ".[$EXTRAS]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# The files, not just a folder: a Keras download that failed leaves its folder empty.
keras_cache="${KERAS_HOME:-$HOME/.keras}/datasets/fashion-mnist"
if [ -z "${LOOKALIKE_DATA_DIR:-}" ] && [ ! -d /usr/share/datasets/fashion-mnist ] \
    && ! ls "$keras_cache"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)" >&2
  apt_install dataset-fashion-mnist || echo "setup: could not install dataset-fashion-mnist;" \
    "download Fashion-MNIST with '.venv/bin/lookalike data fetch', or add the tensorflow" \
    "extra (LOOKALIKE_EXTRAS=$EXTRAS,tensorflow) so that Keras downloads it at the first start" >&2
fi
