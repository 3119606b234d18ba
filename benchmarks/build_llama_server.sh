#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (the strongest CPU serving peer) into .bench/, from the llama.cpp sources that
# the llama-cpp-python sdist ships. Nothing here is committed. AMX is off: its kernels fault in these VMs
# (docs/performance.md). AVX-VNNI is off too: these EPYC CPUs have AVX512-VNNI but not AVX-VNNI, and
# -DGGML_AVX_VNNI=ON dies with SIGILL on the first eval. Takes several minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.bench
mkdir -p "$out/src"
if [ ! -d "$out/src/llama-cpp-python" ]; then
  .venv/bin/python -m pip download --no-deps --no-binary :all: -d "$out/src" 'llama-cpp-python==0.3.36'
  tar -xzf "$out"/src/llama_cpp_python-*.tar.gz -C "$out/src"
  mv "$out"/src/llama_cpp_python-0.3.36 "$out/src/llama-cpp-python"
fi
src="$out/src/llama-cpp-python/vendor/llama.cpp"
cmake -S "$src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF \
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
cmake --build "$out/build" --target llama-server -j 2
cp "$out/build/bin/llama-server" "$out/llama-server"
echo "built $out/llama-server"
