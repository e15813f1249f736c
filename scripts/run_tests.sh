#!/usr/bin/env bash
# The test command: installs the real ComfyUI host and the test tools (first run only), then runs
# the whole suite (core unit tests, real-server tests over HTTP, real-frontend browser tests).
# TURBO4D_HOST picks another host folder (see setup_host.sh for a newer ComfyUI tree).
set -euo pipefail
PACK=$(cd "$(dirname "$0")/.." && pwd)
bash "$PACK/scripts/setup_host.sh" --test
cd "$PACK"
mkdir -p test-artifacts
exec "${TURBO4D_HOST:-$PACK/.host}/venv/bin/python" -m pytest tests -q -rs --durations=15 "$@"
