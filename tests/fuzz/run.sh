#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) and runs each for SECONDS
# (default 60) from its seed corpus of real files. Prints the executions of each run.
#   tests/fuzz/run.sh [SECONDS] [TARGET...]
# Needs: clang, libclang-rt-dev (Debian: clang libclang-rt-14-dev), Eigen, nlohmann-json;
# fuzz_audio also libsndfile and libsoxr (libsndfile1-dev libsoxr-dev), fuzz_opus and fuzz_ws_message libopus and
# libogg (libopus-dev libogg-dev); each is left out of the default list, with a message, where
# pkg-config does not find them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(safetensors config session)
  if pkg-config --exists sndfile soxr 2>/dev/null; then
    targets+=(audio)
  else
    echo "skipping fuzz_audio: libsndfile/libsoxr not found by pkg-config (tools/install-deps.sh)"
  fi
  if pkg-config --exists opus ogg 2>/dev/null; then
    targets+=(opus ws_message)
  else
    echo "skipping fuzz_opus, fuzz_ws_message: libopus/libogg not found by pkg-config (tools/install-deps.sh)"
  fi
fi
cxx=${CLANGXX:-clang++}
out=${FUZZ_OUT:-$root/build-fuzz}
mkdir -p "$out"
flags=(-std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -I"$root/include" -I/usr/include/eigen3 -DTTT_FIXTURES="\"$root/tests/data/fixtures\"")
# Builds run two at a time (CI has two cores), each bounded: a compiler that loops (clang 14 once
# did on a header) fails the step by name instead of eating CI's whole time limit.
build_one() {
  local t=$1 extra=()
  [ "$t" = audio ] && read -r -a extra <<<"$(pkg-config --cflags --libs sndfile soxr)"
  { [ "$t" = opus ] || [ "$t" = ws_message ]; } && read -r -a extra <<<"$(pkg-config --cflags --libs opus ogg)"
  if ! timeout "${FUZZ_BUILD_TIMEOUT:-1200}" "$cxx" "${flags[@]}" "$here/fuzz_$t.cpp" -o "$out/fuzz_$t" "${extra[@]}" \
       >"$out/build_$t.log" 2>&1; then
    echo "building fuzz_$t FAILED (exit $?; 124 = timed out):"
    tail -30 "$out/build_$t.log"
    return 1
  fi
  echo "built fuzz_$t"
}
pids=()
for t in "${targets[@]}"; do
  if [ ! -x "$out/fuzz_$t" ] || [ "$here/fuzz_$t.cpp" -nt "$out/fuzz_$t" ] || \
     [ -n "$(find "$root/include" "$root/examples/ttt_moshi" -newer "$out/fuzz_$t" -name '*.hpp' | head -1)" ]; then
    echo "building fuzz_$t"
    build_one "$t" &
    pids+=($!)
    if [ ${#pids[@]} -ge "${FUZZ_BUILD_JOBS:-2}" ]; then
      wait "${pids[0]}" || exit 1
      pids=("${pids[@]:1}")
    fi
  fi
done
for p in "${pids[@]}"; do wait "$p" || exit 1; done
status=0
for t in "${targets[@]}"; do
  corpus="$out/corpus_$t"
  mkdir -p "$corpus"
  cp -n "$here/corpus/$t"/* "$corpus/" 2>/dev/null || true
  log="$out/fuzz_$t.log"
  echo "running fuzz_$t for ${secs}s"
  maxlen=65536
  [ "$t" = session ] && maxlen=1048576  # a TTT session (tiny_ttt seed) is ~280 KB
  # Leaks inside third-party libraries on malformed input (see the file) are not ours to fix.
  supp="$here/$t.lsan.supp"
  lsan=${LSAN_OPTIONS:-}
  [ -f "$supp" ] && lsan="${lsan:+$lsan:}suppressions=$supp"
  if ! LSAN_OPTIONS="$lsan" "$out/fuzz_$t" "$corpus" -max_total_time="$secs" -max_len=$maxlen -rss_limit_mb=4096 \
       -print_final_stats=1 >"$log" 2>&1; then
    echo "fuzz_$t FAILED (log: $log)"
    tail -40 "$log"
    status=1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  echo "fuzz_$t: ${execs:-?} executions in ${secs}s, corpus $(ls "$corpus" | wc -l) files"
done
exit $status
