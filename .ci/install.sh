#!/usr/bin/env bash
# Idempotent install of recon and its test tools into a virtual environment.
#   bash .ci/install.sh [VENV_DIR]      (default: .venv)
# Installs the Debian libraries Open3D needs, chromium (the report test) and
# blender + python3-numpy (tests/test_downstream.py opens the textured exports
# in Blender) when they are missing (as root or via sudo), creates the venv,
# puts in the CPU build of torch when there is no NVIDIA GPU (set TORCH_SPEC to
# choose another), then `pip install -e .[dev,ray]` (ray: `recon batch` and its
# tests), and the Khronos glTF validator from npm into VENV/node when node is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"

missing=()
# chromium: tests/test_report.py opens the report headless; blender, python3-numpy: tests/test_downstream.py
for pkg in libusb-1.0-0 libgl1 libgomp1 chromium blender python3-numpy; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install -q "${TORCH_SPEC:-torch>=2.3}"
  else
    # CPU build: on this project's machines torch 2.13.0 is served locally as a CPU wheel.
    $PIP install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
$PIP install -q -e ".[dev,ray]"
GLTF_VALIDATOR="gltf-validator@2.0.0-dev.3.10"
if command -v npm >/dev/null 2>&1 && [ ! -f "$VENV/node/node_modules/gltf-validator/package.json" ]; then
  mkdir -p "$VENV/node"
  npm install --silent --no-audit --no-fund --prefix "$VENV/node" "$GLTF_VALIDATOR" \
    || echo "warning: npm could not install $GLTF_VALIDATOR; tests/test_downstream.py will skip the glTF validation"
fi
"$VENV/bin/python" -c "import torch, pycolmap, open3d, trimesh; print(f'recon environment ready: torch {torch.__version__}, pycolmap {pycolmap.__version__}, open3d {open3d.__version__}')"
