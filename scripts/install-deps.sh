#!/usr/bin/env bash
# scripts/install-deps.sh - installs the Debian packages vlmd needs, and only
# those that are missing. Uses sudo when not run as root. Safe to re-run.
set -euo pipefail

PKGS=(
  build-essential pkg-config meson ninja-build
  libopenblas-dev libturbojpeg0-dev libpng-dev libzmq3-dev libjansson-dev
  python3 python3-numpy python3-zmq python3-pil
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1
  fi
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
