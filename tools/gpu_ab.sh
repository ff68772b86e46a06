#!/usr/bin/env bash
# On the GPU machine (device tool): a branch's kernels against main's, in one call. Two trees
# made here by tools/gpu_prebuild.sh (build-dev/bin, packed as gpu_prebuild.sh says) and
# carried: BASE (main's build) and NEW (the branch's).
#   BASE=/tmp/base/bin NEW=/tmp/new/bin tools/gpu_ab.sh [tests] [frames] [train] [profile]
# tests    the CUDA suites of NEW (test_backend_ops, test_ttt_grad_cuda, test_cuda_moshi,
#          test_cuda_conversation, test_ttt_cuda), each time-boxed
# frames   `ttt-moshi bench` 7B frames, bf16 b1, fp8 b1, bf16 b8, BASE and NEW alternated twice;
#          then NEW at bf16 b1 with TTT_GEMV_DENSE_SMALL_MIB 0 and 16, alternated twice
# train    bench_ttt_train TTT-Linear and TTT-MLP, BASE and NEW alternated twice
# profile  tools/gpu_profile.sh split with NEW (ncu of the split backward's kernels)
# prefill  NEW's bench_ttt_layer (C 4096, 32 heads, bf16, L 8192, decode steps) for both kinds, then
#          tools/gpu_profile.sh kernels (ncu of the tensor-core prefill and the decode kernels)
# Logs under $OUT (or ./gpu_out), a line per run on stdout. Nothing here changes GPU settings.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
base=${BASE:?BASE=<main build>/bin}
new=${NEW:?NEW=<branch build>/bin}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests frames train profile)
has() { for s in "${steps[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
# The prebuilt tests have the fixture path /work/main/tests/data compiled in.
[ -e /work/main ] || { mkdir -p /work && ln -s "$(pwd)" /work/main; }
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:$new/lib
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t0 )) s"; }

if has tests; then
  for t in test_backend_ops test_ttt_grad_cuda test_cuda_moshi test_cuda_conversation test_ttt_cuda; do
    (cd /work/main && timeout 240 "$new/tests/$t") > "$out/$t.log" 2>&1
    echo "== $t rc=$?: $(grep -E 'test cases|All tests passed' "$out/$t.log" | tail -1) ($(elapsed))"
  done
  grep -hE "^\[ttt grad cuda|rms_norm .*bf16|sample .*bf16" "$out"/test_*.log | head -20
fi

if has frames; then
  for rep in 1 2; do
    for cfg in "bf16 1" "fp8 1" "bf16 8"; do
      set -- $cfg
      for v in base new; do
        dir=$base; [ $v = new ] && dir=$new
        timeout 120 "$dir/ttt-moshi" bench --preset 7b --backend cuda --dtype "$1" --batch "$2" --frames 100 --warmup 10 \
          > "$out/frame_$1_b$2_${v}_$rep.log" 2>&1
        echo "== frame $v $1 b$2 run $rep rc=$?: $(grep -E '^bench' "$out/frame_$1_b$2_${v}_$rep.log" | head -1)"
      done
    done
  done
  # The experiment knob of NEW: the depformer's small matrices on our GEMV instead of cuBLAS.
  for rep in 1 2; do
    for mib in 0 16; do
      TTT_GEMV_DENSE_SMALL_MIB=$mib timeout 120 "$new/ttt-moshi" bench --preset 7b --backend cuda --dtype bf16 --batch 1 \
        --frames 100 --warmup 10 > "$out/frame_small${mib}_$rep.log" 2>&1
      echo "== frame new bf16 b1 TTT_GEMV_DENSE_SMALL_MIB=$mib run $rep rc=$?: $(grep -E '^bench' "$out/frame_small${mib}_$rep.log" | head -1)"
    done
  done
  echo "frames done ($(elapsed))"
fi

if has train; then
  for rep in 1 2; do
    for v in base new; do
      dir=$base; [ $v = new ] && dir=$new
      timeout 200 "$dir/bench_ttt_train" --kind both --runs 3 > "$out/train_${v}_$rep.log" 2>&1
      echo "== train $v run $rep rc=$?:"
      grep -E "tokens/s|forward|backward" "$out/train_${v}_$rep.log" | head -8
    done
  done
  echo "train done ($(elapsed))"
fi

if has profile; then
  OUT=$out BIN_DIR=$new timeout 200 tools/gpu_profile.sh split 2>&1 | tail -60
  echo "profile done ($(elapsed))"
fi

if has prefill; then
  for kind in linear mlp; do
    timeout 150 "$new/bench_ttt_layer" --backend cuda --kind $kind --batch 1 --seq 8192 --decode-steps 64 \
      > "$out/layer_$kind.log" 2>&1
    echo "== bench_ttt_layer $kind rc=$?"; grep -vE "^\s*$" "$out/layer_$kind.log" | tail -12
  done
  OUT=$out BIN_DIR=$new timeout 300 tools/gpu_profile.sh kernels 2>&1 | tail -80
  echo "prefill done ($(elapsed))"
fi
