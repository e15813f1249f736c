#!/usr/bin/env bash
# Turbo4D demo: installs the ComfyUI host if needed, starts the real server, runs one workflow
# headless, prints where the outputs are and the run's stats line, and stops the server.
#   bash scripts/run_demo.sh                                      # held-out scene: full vs accelerated vs ground truth
#   bash scripts/run_demo.sh workflows/api/turbo4d_from_video.json
# Outputs go to output/demo/ (TURBO4D_DEMO_OUT to change); the server log is written beside them.
set -euo pipefail
PACK=$(cd "$(dirname "$0")/.." && pwd)
HOST=${TURBO4D_HOST:-$PACK/.host}
WF=${1:-$PACK/workflows/api/turbo4d_accel_compare.json}
OUT=${TURBO4D_DEMO_OUT:-$PACK/output/demo}

bash "$PACK/scripts/setup_host.sh"
# The example reference video, where the from-video workflow looks for it (the pack also copies it
# on load; this makes the demo independent of that).
mkdir -p "$HOST/ComfyUI/input" "$OUT"
cp -n "$PACK/workflows/assets/turbo4d_example.mp4" "$HOST/ComfyUI/input/" 2>/dev/null || true

T0=$(date +%s)
TURBO4D_HOST="$HOST" "$HOST/venv/bin/python" "$PACK/scripts/comfy_host.py" run "$WF" \
    --host-dir "$HOST" --output-dir "$OUT" --log "$OUT/comfyui.log"
echo "demo done in $(( $(date +%s) - T0 ))s; outputs in $OUT (grid PNGs: rows = views, columns = frames;"
echo "one H.264 mp4 per view); open the UI-format workflow workflows/$(basename "$WF") in ComfyUI to edit it."
