#!/usr/bin/env bash
# One prepared run on an NVIDIA GPU machine: peaks, the vision check and sweep, the LLM ladder,
# and the report, all written under $OUT (or results/gpu). Needs the wheels from
# scripts/fetch_gpu_wheels.sh in .whl/. Usage: bash scripts/gpu_run.sh [vision|llm|all] (default all).
set -uo pipefail
WHAT=${1:-all}
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
python3 - <<'PY' || exit 1
import torch, litserve, torchao, transformers, timm
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("litserve", litserve.__version__, "torchao", torchao.__version__, "transformers", transformers.__version__, "timm", timm.__version__)
assert torch.cuda.is_available(), "no GPU visible"
PY
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
RS="python3 -m roofserve"
set -x
$RS peak --device cuda --out "$OUT/peak.json"
if [ "$WHAT" = vision ] || [ "$WHAT" = all ]; then
  timeout 240 python3 scripts/gpu_vision_check.py "$OUT/vision-check.json"
  timeout 300 $RS bench vision-model --device cuda --precisions fp16,bf16 --batch-sizes 1,8,32,64,128,256 \
    --pipeline-batch-sizes 32,64 --min-time-s 0.5 --out "$OUT/vision-model.json"
  timeout 420 $RS sweep vision experiments/vision-gpu.toml --skip-model --out "$OUT/vision-sweep.json"
fi
if [ "$WHAT" = llm ] || [ "$WHAT" = all ]; then
  timeout 900 $RS sweep llm experiments/llm-gpu.toml --out "$OUT/llm-sweep.json"
fi
$RS report "$OUT" --out "$OUT/report-$GPU"
