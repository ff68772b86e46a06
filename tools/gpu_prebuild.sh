#!/usr/bin/env bash
# Builds here (no GPU needed) what tools/gpu_check.sh runs on the GPU machine, so that the
# device's time goes to running, not compiling: portable code (no -march=native), sm_90, no
# SentencePiece (the GPU machine may lack the library). Carry build-dev/bin with the call and
# run `BIN_DIR=build-dev/bin tools/gpu_check.sh ...` there.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/cuda/bin:$PATH
cmake -S . -B build-dev -DCMAKE_BUILD_TYPE=Release -DTTT_NATIVE=OFF -DTTT_HEADER_CHECKS=OFF \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_DISABLE_FIND_PACKAGE_PkgConfig=ON >/dev/null
cmake --build build-dev -j"${JOBS:-2}" --target ttt-moshi ttt-layer bench_ttt_layer test_backend_ops test_cuda_moshi \
  test_ttt_cuda test_ttt test_cuda_mimi bench_mimi
strip build-dev/bin/* build-dev/bin/tests/* 2>/dev/null || true
du -sh build-dev/bin
