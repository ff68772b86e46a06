#!/usr/bin/env bash
# Moshi on the CPU, ttt vs the reference PyTorch package, same config, weights, machine and
# thread count, measured in one run. Needs `pip install moshi==0.2.13` (PYTHON points to
# that interpreter) and a built tree (build/bin/bench_moshi_cpu).
#   bench/moshi_cpu.sh [config] [frames]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
config=${1:-$here/configs/moshi_100m.json}
frames=${2:-200}
threads=${THREADS:-$(nproc)}
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=$threads
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $threads threads"
echo "== PyTorch reference (creates the weights)"
out=$("$py" "$here/moshi_cpu_pytorch.py" --config "$config" --save-weights "$work/w.safetensors" \
      --frames "$frames" --threads "$threads" 2>/dev/null | tail -1)
echo "$out"
anchor=$(echo "$out" | sed -n 's/.*median \([0-9.]*\) ms.*/\1/p')
echo "== ttt"
"$root/build/bin/bench_moshi_cpu" --config "$config" --weights "$work/w.safetensors" --frames "$frames" \
  --anchor-ms "$anchor"
