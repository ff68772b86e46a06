#!/usr/bin/env bash
# On the GPU machine (device tool): the CUDA tests, compute-sanitizer and the CUDA benchmarks,
# each time-boxed, logs under $OUT (or ./gpu_out), a short summary on stdout.
#   tools/gpu_check.sh [build|test|sanitize|bench|bench-attn|bench-pdl|bench-gemv|bench-quant|bench-ttt|bench-train|bench-designs|bench-mimi|serve-load|serve-devices|all]...
# serve-load is left out of `all` (minutes): bench/serve_load.py with the 7B on the GPU (SERVE_CLIENTS)
# and the small config on the CPU (SERVE_CPU_CLIENTS); Python wheels for its client from .whl/py312.
# serve-devices (also not in `all`, ~1-2 min): tests/serve/test_engines.py against
# `ttt-moshi serve --backend cuda --devices 0,0` (two engines on the one GPU, small config):
# placement, replies bitwise as alone, periodic save + SIGKILL + resume, a client that stops reading.
#
# Binaries: BIN_DIR (default build-gpu/bin) when it already holds ttt-moshi, else a build into
# build-gpu. A build made elsewhere (`tools/gpu_prebuild.sh`, non-native, sm_90) can be carried
# as build-dev/bin: its tests have the fixture path /work/main/tests/data compiled in, so the
# tree is linked there when it lives elsewhere.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(all)
has() { for s in "${steps[@]}"; do [ "$s" = "$1" ] || [ "$s" = all ] && return 0; done; return 1; }
# Kyutai's moshi package (PyTorch anchors) from the wheel carried in .whl when it is missing.
ensure_moshi() {
  if [ -d .whl ] && ! python3 -c "import moshi" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && \
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}
bin=${BIN_DIR:-build-gpu/bin}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:$(pwd)/$bin/lib  # last: the machine's own first
if [ "$(pwd)" != /work/main ] && [ ! -e /work/main ]; then mkdir -p /work && ln -sfn "$(pwd)" /work/main; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"

if [ -x "$bin/ttt-moshi" ] && ! "$bin/ttt-moshi" --help > "$out/prebuilt.log" 2>&1; then
  echo "prebuilt $bin does not run here:"; tail -3 "$out/prebuilt.log"; bin=build-gpu/bin
fi
if has build && [ ! -x "$bin/ttt-moshi" ]; then
  gen=""; command -v ninja >/dev/null && gen="-G Ninja"
  cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DTTT_HEADER_CHECKS=OFF $gen \
    > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
  start=$(date +%s)
  cmake --build build-gpu -j"$(nproc)" > "$out/build.log" 2>&1 || { grep -E "error" -A5 "$out/build.log" | head -60; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
  bin=build-gpu/bin
fi
t=$bin/tests
mkdir -p "$(dirname "$bin")/tests"   # TTT_TEST_OUT of the CLI test

if has test; then
  # GPU_TESTS: a subset when device time is short (default: all six).
  for tb in ${GPU_TESTS:-test_backend_ops test_cuda_moshi test_ttt_cuda test_cuda_mimi test_ttt_grad_cuda test_cuda_conversation}; do
    s=$(date +%s)
    timeout 150 "$t/$tb" > "$out/$tb.log" 2>&1
    echo "$tb rc=$? ($(( $(date +%s) - s )) s): $(grep -E '^(test cases|All tests passed)' "$out/$tb.log" | tail -1)"
  done
  grep -sE "^\s*(op|[a-z_]+ +(f32|bf16|f16|i64|i32|u8))" "$out/test_backend_ops.log" | tail -40
  grep -s "^\[cuda" "$out/test_cuda_moshi.log"
  grep -sE "^\[ttt" "$out/test_ttt_cuda.log" | tail -30
  grep -sE "^\[mimi" "$out/test_cuda_mimi.log"
  (cd "$(dirname "$bin")/tests" && timeout 120 "$OLDPWD/$t/test_ttt" "[cli]" > "$out/ttt_cli.log" 2>&1)
  echo "ttt-layer CLI rc=$?"; grep "^\[ttt cli\] cuda" "$out/ttt_cli.log"
fi

if has sanitize; then
  set -f  # Catch filters are not globs
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  # memcheck over the CUDA suites (the long cases left out: 10-100x slower under the tool);
  # racecheck (shared memory) over the kernels that share it: TTT inner loops (forward; the
  # backward's TTT-Linear cases, one-kernel and split), attention, sampling.
  for run in "memcheck|test_ttt_cuda|~[long]" "memcheck|test_cuda_moshi|~[bf16]" "memcheck|test_backend_ops|" \
             "memcheck|test_cuda_mimi|~[bf16]" \
             "memcheck|test_ttt_grad_cuda|" \
             "racecheck|test_ttt_cuda|[inner]~[long]" "racecheck|test_backend_ops|attention*,sample*" \
             "racecheck|test_ttt_grad_cuda|[linear]"; do
    IFS='|' read -r tool name args <<< "$run"
    case " ${CS_TOOLS:-memcheck racecheck} " in *" $tool "*) ;; *) continue ;; esac
    s=$(date +%s)
    # shellcheck disable=SC2086
    timeout ${CS_TIMEOUT:-150} "$cs" --tool $tool --error-exitcode 9 "$t/$name" $args > "$out/cs_${tool}_$name.log" 2>&1
    echo "compute-sanitizer $tool $name $args rc=$? ($(( $(date +%s) - s )) s): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/cs_${tool}_$name.log" | tail -1) | $(grep -E '^(test cases|All tests passed)' "$out/cs_${tool}_$name.log" | tail -1)"
  done
fi

if has bench-ttt; then
  timeout 240 "$bin/bench_ttt_layer" --backend cuda 2>&1 | tee "$out/bench_ttt_layer.log" | tail -30
fi

if has bench; then
  # The anchor in the same run: Kyutai's PyTorch moshi (LMGen, its CUDA graphs) at batches 1 and
  # 8 with the context ours attends to (110 frames), when its wheel is carried in .whl; else
  # issue 13's H200 figures, said to be such.
  ensure_moshi
  declare -A anchor=([1]=10.95 [8]=14.64)
  src="issue 13's H200 figures (PyTorch not run here)"
  if python3 -c "import moshi" 2>/dev/null; then
    timeout 300 python3 bench/moshi_pytorch_streams.py --config bench/configs/moshi_7b.json --device cuda \
      --dtype bfloat16 --batches 1,8 --context-frames 110 --frames 100 --warmup 10 > "$out/bench_7b_pytorch.log" 2>&1
    for b in 1 8; do
      v=$(awk -v b="batch=$b" '$1 == "pytorch" && $2 == "frame" && $4 == b {sub("p50=", "", $5); print $5}' "$out/bench_7b_pytorch.log")
      [ -n "$v" ] && anchor[$b]=$v && src="PyTorch moshi measured in this run ($out/bench_7b_pytorch.log)"
    done
  fi
  echo "anchors: batch 1 ${anchor[1]} ms, batch 8 ${anchor[8]} ms: $src"
  for b in 1 8; do
    timeout 150 "$bin/ttt-moshi" bench --preset 7b --backend cuda --dtype bf16 --batch $b --frames 100 --warmup 10 \
      --anchor-ms "${anchor[$b]}" --mimi > "$out/bench_7b_b$b.log" 2>&1
    tail -13 "$out/bench_7b_b$b.log"
  done
fi

# Not part of `all`: Programmatic Dependent Launch off and on (TTT_PDL), the same binary, batch
# 1 and 8, alternated twice so that drift between runs shows.
if printf '%s\n' "${steps[@]}" | grep -qx bench-pdl; then
  for rep in 1 2; do
    for b in 1 8; do
      for pdl in 0 1; do
        TTT_PDL=$pdl timeout 150 "$bin/ttt-moshi" bench --preset 7b --backend cuda --dtype bf16 --batch $b --frames 200 \
          --warmup 20 > "$out/bench_pdl${pdl}_b${b}_$rep.log" 2>&1
        echo "== pdl $pdl batch $b (run $rep) rc=$?: $(grep -E '^bench' "$out/bench_pdl${pdl}_b${b}_$rep.log" | head -1)"
      done
    done
  done
fi

# Not part of `all` (~1.5 min on an H100): the attention kernels, the same binary: TTT_ATTN_VEC=0
# (every shape on attention_kernel) against the default (attention_vec_kernel where rows are
# 16-byte pieces), alternated: 7B frames at batch 1 (an empty ring, then the 35 frames timed and
# warmed up) and at full context (3000 frames, every ring filled) with bf16 and fp8 KV rings,
# ATTN_BATCH streams (default 32), and fp8 weights + fp8 KV at 2x that (KV "same": a bf16
# ring). ATTN_REPS: alternations (default 2).
if printf '%s\n' "${steps[@]}" | grep -qx bench-attn; then
  nb=${ATTN_BATCH:-32}
  for rep in $(seq 1 "${ATTN_REPS:-2}"); do
    for cfg in "bf16 same 1 0" "bf16 same $nb 3000" "bf16 fp8 $nb 3000" "fp8 fp8 $((2 * nb)) 3000"; do
      set -- $cfg
      for vec in 0 1; do
        log="$out/bench_attn_$1_kv$2_b$3_c$4_vec${vec}_$rep.log"
        TTT_ATTN_VEC=$vec timeout 150 "$bin/ttt-moshi" bench --preset 7b --backend cuda --dtype "$1" --kv-dtype "$2" \
          --batch "$3" --context-frames "$4" --frames 30 --warmup 5 > "$log" 2>&1
        echo "== attn vec $vec $1 kv $2 batch $3 context $4 (run $rep) rc=$?: $(grep -E '^bench' "$log" | head -1 | sed 's/.*: median/median/') | $(grep -E '^floor' "$log" | sed 's/.*= //')"
      done
    done
  done
fi

# Not part of `all`: the streaming GEMV (kernels/gemv_stream.cuh) against what it replaces, the
# same binary, alternated twice: fp8 / int8 batch 1-2 with the tiled GEMV (TTT_GEMV_STREAM=0)
# (the default) and the streaming one (1), bf16 batch 1-2 on cuBLAS (the default) and on the
# streaming GEMV (2). GEMV_REPS: how many alternations (default 2).
if printf '%s\n' "${steps[@]}" | grep -qx bench-gemv; then
  for rep in $(seq 1 "${GEMV_REPS:-2}"); do
    for cfg in "fp8 1 0" "fp8 1 1" "int8 1 0" "int8 1 1" "bf16 1 1" "bf16 1 2" "fp8 2 0" "fp8 2 1" "bf16 2 1" "bf16 2 2"; do
      set -- $cfg
      TTT_GEMV_STREAM=$3 timeout 100 "$bin/ttt-moshi" bench --preset 7b --backend cuda --dtype $1 --batch $2 --frames 100 \
        --warmup 10 > "$out/bench_gemv_$1_b$2_s$3_$rep.log" 2>&1
      echo "== gemv stream $3 $1 batch $2 (run $rep) rc=$?: $(grep -E '^bench' "$out/bench_gemv_$1_b$2_s$3_$rep.log" | head -1)"
    done
  done
  grep -hE "floor" "$out"/bench_gemv_*_1.log | sort -u
fi

if has bench-quant; then
  # Batches 1, 2 and 8 with the default routing (the int8 / fp8 GEMV up to 2 rows, then the
  # dequantising cuBLAS path), bf16 beside them, and batch 1 with an fp8 KV cache; then the choices behind the defaults: batch 2
  # through the cuBLAS path (TTT_GEMV_Q_MAX_ROWS=1; 0 at batch 1) and batch 8 with dequantised
  # tiles of 64 MiB and of the whole weight (TTT_DEQUANT_TILE_MIB; the default is 16).
  qrun() {  # name, env assignment (or -), dtype, batch, frames
    local name=$1 envs=$2 dt=$3 b=$4 fr=$5
    [[ -n ${QRUN_ONLY:-} && ! $name =~ $QRUN_ONLY ]] && return  # QRUN_ONLY: a regex on the names, for short runs
    [ "$envs" = - ] && envs=""
    # shellcheck disable=SC2086
    env $envs timeout 150 "$bin/ttt-moshi" bench --preset 7b --backend cuda --dtype $dt --batch $b --frames $fr \
      --warmup 10 > "$out/bench_7b_$name.log" 2>&1
    echo "== 7b $dt batch $b ${envs:-(defaults)} rc=$?"; grep -E "^bench|floor|GiB" "$out/bench_7b_$name.log" | head -4
  }
  for dt in fp8 int8; do
    for b in 1 2 8; do qrun "${dt}_b$b" - $dt $b 100; done
  done
  qrun bf16_b2 - bf16 2 100
  qrun fp8_b1_cublas TTT_GEMV_Q_MAX_ROWS=0 fp8 1 50
  qrun fp8_b2_cublas TTT_GEMV_Q_MAX_ROWS=1 fp8 2 50
  qrun fp8_b8_tile64 TTT_DEQUANT_TILE_MIB=64 fp8 8 50
  qrun fp8_b8_whole TTT_DEQUANT_TILE_MIB=0 fp8 8 50
  # Goal 2's memory with goal 3's cache: fp8 weights and an fp8 KV ring (the full 3000-frame
  # ring is allocated at start, so the GiB line is the 12 GB question).
  qrun fp8_b1_kvfp8 - "fp8 --kv-dtype fp8" 1 100
  qrun bf16_b1_kvfp8 - "bf16 --kv-dtype fp8" 1 100
fi

if has bench-train; then
  # The anchor first, in the same run: ttt-lm-pytorch's own layers (TTT_PY: its ttt.py, carried
  # in an ignored folder; default .ttt_ref/ttt.py) forward + backward at the same shape; its
  # tokens/s go to bench_ttt_train, which prints them beside ours.
  anchors=()
  if [ -f "${TTT_PY:-.ttt_ref/ttt.py}" ]; then
    timeout 240 python3 bench/ttt_train_pytorch.py --ttt-py "${TTT_PY:-.ttt_ref/ttt.py}" 2>&1 |
      tee "$out/bench_ttt_train_pytorch.log" | grep -vi warn
    for k in linear mlp; do
      v=$(awk -v k=$k '$1 == "ANCHOR" && $2 == k {print $3}' "$out/bench_ttt_train_pytorch.log")
      [ -n "$v" ] && anchors+=(--anchor-$k "$v")
    done
  else
    echo "ttt-lm-pytorch anchor not measured: no ${TTT_PY:-.ttt_ref/ttt.py} (TTT_PY)"
  fi
  # TRAIN_ARGS: e.g. "--inner-sweep" (block sizes x shared-memory placements first) or "--kind linear".
  # shellcheck disable=SC2086
  timeout 300 "$bin/bench_ttt_train" ${TRAIN_ARGS:-} "${anchors[@]}" 2>&1 | tee "$out/bench_ttt_train.log" | tail -20
fi

if has bench-designs; then
  for d in replace16 after3 inplace5 kvmem8; do
    timeout 150 "$bin/ttt-moshi" bench --config bench/configs/moshi_7b_$d.json --backend cuda --dtype bf16 --batch 1 \
      --frames 100 --warmup 10 > "$out/bench_7b_$d.log" 2>&1
    echo "== $d rc=$?"; tail -6 "$out/bench_7b_$d.log"
  done
fi

# Not part of `all` (~5-6 min): issue 13 goal 4, `ttt-moshi bench --max-streams`: the largest
# batch whose frame stays <= 80 ms (median) with every KV ring full (3000 frames) and that fits
# in memory, for plain Moshi 7B bf16, replace16 bf16, plain fp8, and fp8 / bf16 weights with an
# fp8 KV cache (3 warm-up + 10 timed frames per tried batch), PyTorch moshi searched the same way
# (MAX_STREAMS_NO_PYTORCH=1 leaves it out), then a summary table.
# MAX_STREAMS_RUNS replaces the list: space-separated name|dtype|config|kv entries, config empty
# for the 7B preset, kv the --kv-dtype (empty: same) (e.g. add
# "kvmem8|bf16|bench/configs/moshi_7b_kvmem8.json|" or "plain|int8||int8").
if printf '%s\n' "${steps[@]}" | grep -qx max-streams; then
  rows=()
  # One word per run (a quoted default inside ${:-} stayed one word and broke the first run).
  runs=(${MAX_STREAMS_RUNS:-plain\|bf16\|\| replace16\|bf16\|bench/configs/moshi_7b_replace16.json\| plain\|fp8\|\| plain\|fp8\|\|fp8 plain\|bf16\|\|fp8})
  for run in "${runs[@]}"; do
    IFS='|' read -r name dt cfgf kv <<< "$run"
    args=(--preset 7b)
    [ -n "$cfgf" ] && args=(--config "$cfgf")
    kv=${kv:-same}
    log="$out/max_streams_${name}_${dt}_kv_$kv.log"
    s=$(date +%s)
    timeout 240 "$bin/ttt-moshi" bench "${args[@]}" --backend cuda --dtype "$dt" --kv-dtype "$kv" --max-streams \
      --frames 10 --warmup 3 > "$log" 2>&1
    echo "== max-streams $name $dt kv $kv rc=$? ($(( $(date +%s) - s )) s)"
    grep -E "^(max-streams|floor|anchor)" "$log" | grep -v "^max-streams result"
    res=$(grep "^max-streams result:" "$log" | tail -1)
    rows+=("$name $dt $kv ${res:-no result}")
  done
  # PyTorch beside it, searched the same way (bench/moshi_pytorch_streams.py: Kyutai's LMGen with
  # its CUDA graphs, temporal KV caches filled to 3000 frames); the moshi wheel from .whl.
  if [ -z "${MAX_STREAMS_NO_PYTORCH:-}" ]; then
    ensure_moshi
    log="$out/max_streams_pytorch.log"
    s=$(date +%s)
    timeout 420 python3 bench/moshi_pytorch_streams.py --config bench/configs/moshi_7b.json --device cuda \
      --dtype bfloat16 --frames 10 --warmup 3 > "$log" 2>&1
    echo "== max-streams pytorch bf16 rc=$? ($(( $(date +%s) - s )) s)"
    grep -vE "^max-streams result|Warning|warn" "$log" | tail -20
    res=$(grep "^max-streams result:" "$log" | tail -1)
    rows+=("pytorch-moshi bf16 bf16 ${res:-no result}")
  fi
  echo "| config | dtype | KV | max streams (<= 80 ms) | p50 ms | p99 ms | GiB used | next batch |"
  echo "|---|---|---|---|---|---|---|---|"
  for row in "${rows[@]}"; do
    echo "$row" | awk '{ v["streams"] = "?"; for (i = 4; i <= NF; ++i) { split($i, kv, "="); v[kv[1]] = kv[2] }
      printf "| %s | %s | %s | %s | %s | %s | %s | %s %s |\n", $1, $2, $3, v["streams"], v["p50"], v["p99"], v["gib"], v["next"], v["next_state"] }'
  done
  echo "anchor (PyTorch moshi 0.2.13 on the H200, 2026-12-06, when not measured above): 84 streams (batch 64 at 35.3 ms, 84 at 42.8 ms, 85 does not fit; issue 13 quoted 64)"
fi

if has bench-mimi; then
  # Kyutai's PyTorch Mimi as the anchor in the same run: the moshi wheel is carried in .whl.
  ensure_moshi
  for run in "bfloat16 1" "bfloat16 64" "float32 1"; do
    read -r dt b <<< "$run"
    BIN_DIR=$bin FRAMES=${MIMI_FRAMES:-100} timeout 300 bench/mimi.sh --device cuda --dtype "$dt" --batch "$b" \
      > "$out/bench_mimi_${dt}_b$b.log" 2>&1
    echo "== mimi cuda $dt batch $b rc=$?"; tail -5 "$out/bench_mimi_${dt}_b$b.log"
  done
fi

# The serve modes' Python client (aiohttp + sphn): wheels carried in .whl/py312 when missing.
serve_python() {
  if ! python3 -c "import sphn, aiohttp, numpy" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-compile --no-cache-dir --target /tmp/pysite .whl/py312/*.whl >/dev/null 2>&1
    export PYTHONPATH=/tmp/pysite${PYTHONPATH:+:$PYTHONPATH}
  fi
}

# Not part of `all`: two engines on one GPU (serve --devices 0,0), through the real client.
if printf '%s\n' "${steps[@]}" | grep -qx serve-devices; then
  serve_python
  s=$(date +%s)
  timeout 400 python3 tests/serve/test_engines.py --bin "$bin/ttt-moshi" --wav examples/audio/user.wav \
    --config examples/configs/small.json --devices 0,0 --serve-args="--backend cuda" > "$out/serve_devices.log" 2>&1
  echo "serve-devices rc=$? ($(( $(date +%s) - s )) s): $(grep -cE '^ok ' "$out/serve_devices.log") ok, $(grep -cE '^FAIL' "$out/serve_devices.log") failed"
  grep -E "^(FAIL|-- |test_engines|slow client)|two at once|bitwise|periodic|too slow|in time" "$out/serve_devices.log" | head -30
fi

# Not part of `all`: the server under load (minutes).
if printf '%s\n' "${steps[@]}" | grep -qx serve-load; then
  serve_python
  timeout 480 python3 bench/serve_load.py --bin "$bin/ttt-moshi" --clients "${SERVE_CLIENTS:-16,64}" \
    --seconds "${SERVE_SECONDS:-20}" --procs 12 -- --config bench/configs/moshi_7b.json \
    --mimi-config bench/configs/mimi_kyutai.json --backend cuda --dtype bf16 2>&1 | tee "$out/serve_load_cuda.log"
  if [ -n "${SERVE_CPU_CLIENTS:-}" ]; then
    timeout 240 python3 bench/serve_load.py --bin "$bin/ttt-moshi" --clients "$SERVE_CPU_CLIENTS" --seconds 15 \
      --procs 4 2>&1 | tee "$out/serve_load_cpu.log"
  fi
fi
