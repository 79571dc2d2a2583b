#!/bin/sh
# CMAKE_ARGS for building llama-cpp-python (README's install command):
#   CMAKE_ARGS="$(sh scripts/llama-cpp-cmake-args.sh)" pip install --no-cache-dir ...
# On x86-64, a build for any CPU with AVX2 instead of llama.cpp's default "native" build: on CPUs with AMX
# (Intel Sapphire Rapids and later, what many clouds hand out) the native build's AMX kernels crash the
# server on its first completion. Elsewhere (ARM64, ...) nothing: llama.cpp's own native build is safe.
# The same flags are st_synth.generation.local_llm.PORTABLE_CMAKE_ARGS (the rebuild hint); a test keeps them equal.
case "${ST_SYNTH_ARCH:-$(uname -m)}" in
    x86_64 | amd64 | AMD64)
        echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" ;;
esac
