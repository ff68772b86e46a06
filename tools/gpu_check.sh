#!/usr/bin/env bash
# On the GPU machine (device tool): build, run the whole test suite with the CUDA tests,
# then the CUDA benchmarks. Logs go to $OUT (or ./gpu_out). Steps are time-boxed.
#   tools/gpu_check.sh [build|test|bench|all]...
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# A snapshot of a commit (`git archive HEAD > build-src/head.tar`, carried) is built instead
# of the working tree when present: other work in progress in the tree stays out of it.
if [ -f build-src/head.tar ]; then
  rm -rf /tmp/ttt-src && mkdir -p /tmp/ttt-src && tar -xf build-src/head.tar -C /tmp/ttt-src
  mkdir -p build-snap
  ln -sfn "$(pwd)/build-snap" /tmp/ttt-src/build-gpu
  cd /tmp/ttt-src
fi
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(all)
has() { for s in "${steps[@]}"; do [ "$s" = "$1" ] || [ "$s" = all ] && return 0; done; return 1; }
bd=build-gpu
if has build; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  gen=""; command -v ninja >/dev/null && gen="-G Ninja"
  cmake -S . -B $bd -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 $gen > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
  start=$(date +%s)
  cmake --build $bd -j"$(nproc)" > "$out/build.log" 2>&1 || { grep -E "error" -A5 "$out/build.log" | head -60; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
fi
if has test; then
  timeout 420 ctest --test-dir $bd --output-on-failure -j4 > "$out/ctest.log" 2>&1
  tail -25 "$out/ctest.log"
  timeout 120 $bd/bin/tests/test_backend_ops > "$out/backend_ops.log" 2>&1; echo "backend_ops rc=$?"
  grep -E "^\s*(op|[a-z_]+ +(f32|bf16|f16|i64|i32|u8))" "$out/backend_ops.log" | tail -70
  timeout 120 $bd/bin/tests/test_cuda_moshi > "$out/cuda_moshi.log" 2>&1; echo "cuda_moshi rc=$?"
  grep "^\[cuda" "$out/cuda_moshi.log"
fi
if has bench; then
  for b in 1 8; do
    timeout 200 $bd/bin/ttt-moshi bench --preset 7b --backend cuda --dtype bf16 --batch $b --frames 100 --warmup 10 \
      --anchor-ms $([ $b = 1 ] && echo 12.56 || echo 16.49) 2>&1 | tee "$out/bench_7b_b$b.log"
  done
fi
