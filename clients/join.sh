#!/usr/bin/env bash
# Join a hive from any Linux or macOS machine: installs a pinned hived release in a virtual
# environment (CUDA PyTorch where an NVIDIA driver is present, CPU otherwise) and runs
# `hived join`. The key is read from HIVED_KEY or asked for, never put on the command line.
#
#   curl -fsSLO https://example.org/join.sh   # or copy this file
#   HIVED_KEY=... bash join.sh ws://coordinator.example:8765 [--name my-pc]
set -euo pipefail

HIVED_VERSION="${HIVED_VERSION:-0.1.0}"
HIVED_SPEC="${HIVED_SPEC:-hived==${HIVED_VERSION}}"   # e.g. a git URL or a wheel file instead
VENV="${HIVED_VENV:-$HOME/.hived-venv}"

if [ $# -lt 1 ]; then
  echo "usage: HIVED_KEY=... bash join.sh ws://HOST:PORT [hived join options]" >&2
  exit 2
fi
URL="$1"; shift

if [ -z "${HIVED_KEY:-}" ]; then
  read -rsp "hive key (from the coordinator's operator): " HIVED_KEY; echo
fi
export HIVED_KEY

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$VENV/bin/pip" install torch                      # CUDA build
  else
    "$VENV/bin/pip" install torch --index-url https://download.pytorch.org/whl/cpu
  fi
  "$VENV/bin/pip" install "$HIVED_SPEC"
fi

exec "$VENV/bin/hived" join "$URL" --name "${HIVED_NAME:-$(hostname)}" "$@"
