#!/usr/bin/env bash
# Builds here (no GPU needed) what tools/gpu_check.sh runs on the GPU machine, so that the
# device's time goes to running, not compiling: portable code (no -march=native), sm_90, no
# the distribution's shared libraries that the GPU machine may lack (SentencePiece, libsndfile,
# libsoxr, libopus, libogg, ...) copied into build-dev/bin/lib, which gpu_check.sh puts last on
# LD_LIBRARY_PATH. Carry build-dev/bin with the call and run `BIN_DIR=build-dev/bin
# tools/gpu_check.sh ...` there. To carry it, pack with a large xz dictionary (`tar cf - bin/... |
# xz -9e --lzma2=dict=192MiB`): every CUDA binary holds the same kernels, which a dictionary
# larger than one binary stores once (all of the test binaries: 14 MB against 69 with xz -6).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/cuda/bin:$PATH
cmake -S . -B build-dev -DCMAKE_BUILD_TYPE=Release -DTTT_NATIVE=OFF -DTTT_HEADER_CHECKS=OFF \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_DISABLE_FIND_PACKAGE_PkgConfig=OFF >/dev/null
cmake --build build-dev -j"${JOBS:-2}" --target ttt-moshi ttt-layer bench_ttt_layer test_backend_ops test_cuda_moshi \
  test_ttt_cuda test_ttt test_cuda_mimi bench_mimi test_ttt_grad_cuda test_cuda_conversation bench_ttt_train
strip build-dev/bin/* build-dev/bin/tests/* 2>/dev/null || true
# The libraries the binaries link beyond the C/C++ runtime and CUDA's own.
mkdir -p build-dev/bin/lib
ldd build-dev/bin/ttt-moshi build-dev/bin/tests/* 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u |
  grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|libpthread|libdl|librt|ld-linux[^/]*|libcuda|libcudart|libcublas[^/]*|libgomp)\.so' |
  xargs -r cp -L -t build-dev/bin/lib
du -sh build-dev/bin
