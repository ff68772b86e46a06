#!/usr/bin/env bash
# Installs what ttt needs to build and test, from the distribution's packages (Debian 12 /
# Ubuntu 24.04). Idempotent: a machine that has everything installs nothing and prints nothing
# (so the README's commands can call it every time). Runs apt-get as root or through sudo.
# The CUDA toolkit is optional and not installed here: with nvcc on the PATH (or in
# /usr/local/cuda/bin) the CUDA backend is built too.
set -euo pipefail

pkgs=(cmake g++ make pkg-config libeigen3-dev catch2 libcxxopts-dev nlohmann-json3-dev
      libbenchmark-dev libsentencepiece-dev libsndfile1-dev libsoxr-dev libopus-dev libogg-dev
      libboost-dev libssl-dev python3 python3-venv haproxy)
# Extra groups: "sanitize" (clang, its runtimes and OpenMP: the fuzzers and the sanitizer suite),
# "audio-tools" (espeak-ng and sox, to regenerate examples/audio/: tools/make_example_audio.sh),
# "browser" (Debian's chromium, ~350 MB, for tests/serve/test_web.py; on Ubuntu the package is a
# snap stub, use Google's Chrome there). haproxy (above) is for tests/serve/test_failover.py.
# "torch" (Debian's PyTorch 1.13 CPU with its C++ headers, ~150 MB download, and ninja for its JIT
# extension builds: the PyTorch extension's tests, examples/pytorch; CI installs it).
for group in "$@"; do
  case "$group" in
    sanitize) pkgs+=(clang libclang-rt-14-dev libomp-dev) ;;
    audio-tools) pkgs+=(espeak-ng sox) ;;
    browser) pkgs+=(chromium) ;;
    torch) pkgs+=(python3-torch libtorch-dev ninja-build) ;;
    *) echo "install-deps: unknown group '$group' (known: sanitize, audio-tools, browser, torch)" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The Python packages of the tests (a virtual environment; idempotent too).
py_env() { "$(dirname "$0")/python_env.sh"; }
[ ${#missing[@]} -eq 0 ] && { py_env; exit 0; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
py_env
