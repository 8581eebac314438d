#!/usr/bin/env bash
# Build llama.cpp's own HTTP server (`llama-server`: continuous batching with --parallel N), the peer
# of `roofserve serve llm --max-batch-size N`, from the llama.cpp source that the llama-cpp-python
# source distribution vendors (Debian has no llama.cpp package), with llama-bench (its engine benchmark)
# and llama-quantize (the GGUF benchmarks' Q4_K_M files). About 6 minutes on 2 cores.
# Usage: bash scripts/build_llama_server.sh   -> .cache/llama-server/bin/{llama-server,llama-bench,llama-quantize}
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
ROOT=.cache/llama-server
PY=${PY:-.venv/bin/python}
TOOLS="llama-server llama-bench llama-quantize"
if [ -x "$ROOT/bin/llama-server" ] && [ -x "$ROOT/bin/llama-bench" ] && [ -x "$ROOT/bin/llama-quantize" ]; then
  echo "already built: $ROOT/bin/ ($TOOLS)"
  exit 0
fi
mkdir -p "$ROOT/src" "$ROOT/bin"
if [ ! -f "$ROOT/llama_cpp_python-$VERSION.tar.gz" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$ROOT"
fi
tar -xzf "$ROOT/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT/src"
SRC="$ROOT/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
# -march=native, but no AMX: virtual machines often do not grant a process the AMX tile state, and
# ggml's AMX kernels then die with SIGILL (seen here on a Xeon VM); explicit -mno-* win over -march.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$SRC" -B "$ROOT/build" -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
  > "$ROOT/cmake.log" 2>&1
# shellcheck disable=SC2086
cmake --build "$ROOT/build" --target $TOOLS -j"$(nproc)" > "$ROOT/build.log" 2>&1 || { tail -20 "$ROOT/build.log"; exit 1; }
for tool in $TOOLS; do  # their shared libraries stay in build/
  cp "$(find "$ROOT/build" -name "$tool" -type f -perm -u+x | head -1)" "$ROOT/bin/$tool"
done
rm -rf "$ROOT/src"
echo "built: $ROOT/bin/ ($TOOLS)"
