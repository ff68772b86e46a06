#!/usr/bin/env bash
# On the GPU machine (device tool): a branch's kernels against main's, in one call. Two trees
# made here by tools/gpu_prebuild.sh (build-dev/bin, packed as gpu_prebuild.sh says) and
# carried: BASE (main's build) and NEW (the branch's).
#   BASE=/tmp/base/bin NEW=/tmp/new/bin tools/gpu_ab.sh [tests] [frames] [train] [profile]
# tests    the CUDA suites of NEW (test_backend_ops, test_ttt_grad_cuda, test_cuda_moshi,
#          test_cuda_conversation, test_ttt_cuda), each time-boxed
# frames   `ttt-moshi bench` 7B frames, BASE and NEW alternated AB_REPS times (default 2): AB_CFGS,
#          space-separated dtype,kv-dtype,batch,context-frames (default bf16 b1, fp8 b1, bf16 b8
#          at 110 frames), AB_FRAMES timed frames (default 100) after 10 warm-up
# small    NEW at bf16 b1 with TTT_GEMV_DENSE_SMALL_MIB 0 and 16, alternated twice
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
  for rep in $(seq 1 "${AB_REPS:-2}"); do
    for cfg in ${AB_CFGS:-bf16,same,1,110 fp8,same,1,110 bf16,same,8,110}; do
      IFS=, read -r dt kv b ctx <<< "$cfg"
      for v in base new; do
        dir=$base; [ $v = new ] && dir=$new
        log="$out/frame_${dt}_kv${kv}_b${b}_c${ctx}_${v}_$rep.log"
        timeout 150 "$dir/ttt-moshi" bench --preset 7b --backend cuda --dtype "$dt" --kv-dtype "$kv" --batch "$b" \
          --context-frames "$ctx" --frames "${AB_FRAMES:-100}" --warmup 10 > "$log" 2>&1
        echo "== frame $v $dt kv $kv b$b context $ctx run $rep rc=$?: $(grep -E '^bench' "$log" | head -1 | sed 's/.*: median/median/') | $(grep -E '^floor' "$log" | sed 's/.*= //')"
      done
    done
  done
  echo "frames done ($(elapsed))"
fi

if has small; then
  # The experiment knob of NEW: the depformer's small matrices on our GEMV instead of cuBLAS.
  for rep in 1 2; do
    for mib in 0 16; do
      TTT_GEMV_DENSE_SMALL_MIB=$mib timeout 120 "$new/ttt-moshi" bench --preset 7b --backend cuda --dtype bf16 --batch 1 \
        --frames 100 --warmup 10 > "$out/frame_small${mib}_$rep.log" 2>&1
      echo "== frame new bf16 b1 TTT_GEMV_DENSE_SMALL_MIB=$mib run $rep rc=$?: $(grep -E '^bench' "$out/frame_small${mib}_$rep.log" | head -1)"
    done
  done
  echo "small done ($(elapsed))"
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
