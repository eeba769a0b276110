#!/usr/bin/env python3
"""Print the CMAKE_ARGS for building llama-cpp-python on this machine's CPU.

Why not simply GGML_NATIVE=ON: on CPUs with AMX (Intel Sapphire Rapids and newer) ggml's AMX path crashes on
the first decode (upstream llama.cpp issue #20824). There we build without -march=native and switch on every
SIMD extension the CPU reports except AMX. Each flag is enabled only when /proc/cpuinfo lists it: an AMD Zen 4
has AVX-512 VNNI but not the 256-bit AVX-VNNI, and enabling that one gives "Illegal instruction".
Elsewhere (no AMX, non-Linux, non-x86) the native build is right. GPU flags are the user's: anything already
in $CMAKE_ARGS (e.g. -DGGML_CUDA=on) is kept.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

# /proc/cpuinfo flag -> ggml CMake option (x86 only).
_X86_FLAGS = {
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_args(flags: set[str], machine: str, user_args: str = "") -> str:
    args = user_args.split()
    is_x86 = machine in ("x86_64", "AMD64", "i686")
    if is_x86 and any(f.startswith("amx") for f in flags):
        args.append("-DGGML_NATIVE=OFF")
        for flag, option in _X86_FLAGS.items():
            args.append(f"-D{option}={'ON' if flag in flags else 'OFF'}")
    return " ".join(args)


if __name__ == "__main__":
    print(cmake_args(cpu_flags(), platform.machine(), os.environ.get("CMAKE_ARGS", "")))
