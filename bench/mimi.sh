#!/usr/bin/env bash
# Mimi streaming, ttt vs Kyutai's PyTorch Mimi (moshi 0.2.13), same config, same weights,
# same machine and thread count, measured in one run: the PyTorch side creates (seeded) weights,
# then bench_mimi loads them and prints its times beside the anchor.
#   bench/mimi.sh [--device cpu|cuda] [--dtype float32|bfloat16] [--batch B] [--config C]
# Needs `pip install moshi==0.2.13` (PYTHON points to that interpreter) and a built tree
# (BIN_DIR, default build/bin).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${BIN_DIR:-$(dirname "$here")/build/bin}
py=${PYTHON:-python3}
device=cpu dtype=float32 batch=1 config="" frames=${FRAMES:-50}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --dtype) dtype=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    *) echo "mimi.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
threads=${THREADS:-$(nproc)}
export OMP_NUM_THREADS=$threads
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cfg_py=() cfg_cc=()
if [ -n "$config" ]; then cfg_py=(--config "$config"); cfg_cc=(--config "$config"); fi
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $threads threads; device $device, $dtype, batch $batch"
out=$("$py" "$here/mimi_pytorch.py" "${cfg_py[@]}" --device "$device" --dtype "$dtype" --batch "$batch" \
      --threads "$threads" --frames "$frames" --save-weights "$work/mimi.safetensors" 2>/dev/null | tail -1)
echo "$out"
ae=$(echo "$out" | sed -n 's/.*encode \([0-9.]*\) ms.*/\1/p')
ad=$(echo "$out" | sed -n 's/.*decode \([0-9.]*\) ms.*/\1/p')
backend=$([ "$device" = cpu ] && echo cpu || echo cuda)
dt=$([ "$dtype" = bfloat16 ] && echo bf16 || echo f32)
"$bin/bench_mimi" "${cfg_cc[@]}" --weights "$work/mimi.safetensors" --backend "$backend" --dtype "$dt" \
  --batch "$batch" --frames "$frames" --anchor-encode-ms "$ae" --anchor-decode-ms "$ad"
