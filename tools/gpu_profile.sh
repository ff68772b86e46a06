#!/usr/bin/env bash
# On the GPU machine: Nsight Compute on the TTT inner-loop kernels of bench_ttt_layer (stall
# reasons, occupancy, hottest SASS), one launch each, clocks left alone. Logs under $OUT.
#   BIN_DIR=build-dev/bin tools/gpu_profile.sh [kernels|steps|frame|backward|split]
# backward: the TTT inner loop's backward kernel (bench_ttt_train, L 1024, one launch per kind;
# TRAIN_ARGS passes e.g. "--threads 1024"), stall reasons and memory traffic.
# split: the TTT-Linear split backward's two kernels (free: parallel over mini-batches; chain: one
# block per head), one launch each at L 1024, with the hottest source lines.
# frame: every kernel of eager Moshi 7B frames (bf16, FRAME_BATCH rows, default 1) with its time
# and DRAM bytes, summarised per kernel by tools/ncu_frame.py (where a frame's time goes).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
bin=${BIN_DIR:-build-gpu/bin}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:$(pwd)/$bin/lib  # a prebuilt tree's libsndfile etc.
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "no ncu"; exit 1; }
sections="--section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats --section SourceCounters"
run() {  # name regex bench-args...
  local name=$1 re=$2; shift 2
  # shellcheck disable=SC2086
  timeout 120 "$ncu" --clock-control none -k "regex:$re" -c 1 $sections "$bin/bench_ttt_layer" --backend cuda "$@" \
    > "$out/ncu_$name.txt" 2>&1
  echo "== $name rc=$?"
  grep -E "Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Stall|stall|Block Limit|Theoretical Occ" \
    "$out/ncu_$name.txt" | head -30
}
# Kernel durations of decode steps (eager steps, then the inner loop alone, then graph replays),
# caches flushed between kernels as ncu does by default.
steps() {  # name bench-args...
  local name=$1; shift
  timeout 150 "$ncu" --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
    -c 80 "$bin/bench_ttt_layer" --backend cuda --batch 1 --seq 0 --decode-steps 8 --runs 1 "$@" > "$out/ncu_$name.txt" 2>&1
  echo "== $name rc=$?"
  awk '/^  [a-zA-Z_].*\(/ {k=$1} /gpu__time_duration.sum/ {printf "%-60s %s %s\n", substr(k,1,60), $(NF-1), $NF}' \
    "$out/ncu_$name.txt" | tail -${TAIL:-12}
}
case "${1:-kernels}" in
  frame)
    b=${FRAME_BATCH:-1} dt=${FRAME_DTYPE:-bf16}
    name=${dt}_b$b${FRAME_TAG:+_$FRAME_TAG}  # FRAME_TAG: tells runs with other TTT_* settings apart
    # FRAME_CONTEXT: frames of KV context filled first (3000: the attention of a full ring).
    timeout "${FRAME_TIMEOUT:-300}" "$ncu" --clock-control none --csv --page raw \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
      "$bin/ttt-moshi" bench --preset 7b --backend cuda --dtype "$dt" --batch "$b" --frames 3 --warmup 1 \
      --context-frames "${FRAME_CONTEXT:-0}" \
      --no-graph > "$out/ncu_frame_$name.csv" 2>&1
    echo "== frame $name rc=$?"
    python3 tools/ncu_frame.py "$out/ncu_frame_$name.csv" --bandwidth-tbs "${FRAME_BW_TBS:-4.2}" --top ${FRAME_TOP:-40} \
      | tee "$out/ncu_frame_$name.txt" ;;
  backward)
    for kind in linear mlp; do
      # shellcheck disable=SC2086
      timeout 150 "$ncu" --clock-control none -k "regex:ttt_inner_backward" -c 1 $sections \
        --section MemoryWorkloadAnalysis "$bin/bench_ttt_train" --kind $kind --seq 1024 --runs 1 --warmup 0 \
        ${TRAIN_ARGS:-} > "$out/ncu_backward_$kind.txt" 2>&1
      echo "== backward $kind rc=$?"
      grep -E "Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Stall|stall|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Memory Throughput|Compute \(SM\)" \
        "$out/ncu_backward_$kind.txt" | head -40
    done ;;
  split)
    for k in ttt_linear_free_kernel ttt_linear_chain_kernel; do
      # shellcheck disable=SC2086
      timeout 150 "$ncu" --clock-control none -k "regex:$k" -c 1 $sections --section MemoryWorkloadAnalysis \
        --print-source sass --page source --print-summary none "$bin/bench_ttt_train" --kind linear --seq 1024 \
        --runs 1 --warmup 0 ${TRAIN_ARGS:-} > "$out/ncu_src_$k.txt" 2>&1
      # shellcheck disable=SC2086
      timeout 150 "$ncu" --clock-control none -k "regex:$k" -c 1 $sections --section MemoryWorkloadAnalysis \
        "$bin/bench_ttt_train" --kind linear --seq 1024 --runs 1 --warmup 0 ${TRAIN_ARGS:-} > "$out/ncu_$k.txt" 2>&1
      echo "== $k rc=$?"
      grep -E "Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Stall|stall|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Memory Throughput|Compute \(SM\)|Grid Size|Block Size" \
        "$out/ncu_$k.txt" | head -40
    done ;;
  kernels)
    run mlp_tc ttt_mlp_tc --kind mlp --batch 1 --seq 1024 --decode-steps 0 --runs 1
    run linear_tc ttt_linear_tc --kind linear --batch 1 --seq 1024 --decode-steps 0 --runs 1
    run linear_decode ttt_linear_decode --kind linear --batch 1 --seq 0 --decode-steps 16 --runs 1
    run mlp_decode ttt_mlp_decode --kind mlp --batch 1 --seq 0 --decode-steps 16 --runs 1 ;;
  steps)
    steps linear_fused --kind linear
    steps linear_unfused --kind linear --fused-step 0
    steps mlp --kind mlp ;;
esac
