#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (the CPU peer of benchmarks/vs_llamacpp.py) from the llama-cpp-python source
# distribution on PyPI, which vendors llama.cpp. About 10 minutes on 2 cores; for benchmarks only, never in CI.
#   benchmarks/build_llama_server.sh [DEST]      (default DEST: ~/.cache/loraplex/llama.cpp)
# Prints the server's path last; the converter is DEST/src/convert_hf_to_gguf.py.
set -euo pipefail
DEST="${1:-$HOME/.cache/loraplex/llama.cpp}"
PY="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$DEST"
if [ ! -d "$DEST/src" ]; then
  tmp="$(mktemp -d)"
  "$PY" -m pip download --no-binary :all: --no-deps llama-cpp-python -d "$tmp" >&2
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$DEST/src"
  rm -rf "$tmp"
fi
# Native CPU build (AVX-512/AVX512-BF16 where the CPU has them), no curl, no GPU backends: what `llama-server`
# users get on a CPU box.
cmake -S "$DEST/src" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$DEST/build" --target llama-server -j "$JOBS" >&2
echo "$DEST/build/bin/llama-server"
