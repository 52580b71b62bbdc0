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
# This CPU's instruction sets (AVX-512 with VNNI and BF16 where present), no curl, no GPU backends: what
# `llama-server` users get on a CPU box. Not GGML_NATIVE: VMs report amx_* flags their kernel has not enabled,
# and ggml's AMX path for Q8_0/Q4 then dies with SIGILL (it did on the 2-core dev VM). AMX=ON builds it anyway.
flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
has() { case " $flags " in *" $1 "*) echo ON ;; *) echo OFF ;; esac; }
AMX="${AMX:-OFF}"
cmake -S "$DEST/src" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" \
  -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)" -DGGML_AVX512="$(has avx512f)" \
  -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)" \
  -DGGML_AVX512_BF16="$(has avx512_bf16)" -DGGML_AMX_TILE="$AMX" -DGGML_AMX_INT8="$AMX" -DGGML_AMX_BF16="$AMX" \
  -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$DEST/build" --target llama-server -j "$JOBS" >&2
echo "$DEST/build/bin/llama-server"
