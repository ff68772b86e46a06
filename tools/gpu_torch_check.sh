#!/usr/bin/env bash
# On the GPU machine (device tool): the torch extension's CUDA op against its CPU op
# (examples/pytorch/tests/test_cuda.py), JIT-built with the machine's torch and nvcc.
# The device reaches no package index: where ninja or Eigen is missing, carry a folder (default
# .devbin-torch, git-ignored) holding a ninja wheel (`pip download ninja --only-binary=:all:
# --platform manylinux2014_x86_64 --no-deps`) and eigen3.tar.xz (`tar cJf eigen3.tar.xz -C
# /usr/include eigen3`).  Usage: [CARRY=.devbin-torch] tools/gpu_torch_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
carry=${CARRY:-.devbin-torch}
python3 -c "import torch;print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
/usr/local/cuda/bin/nvcc --version | tail -2
export PATH=/usr/local/cuda/bin:$PATH
if ! command -v ninja >/dev/null; then
  mkdir -p /tmp/ninja && python3 -c "import zipfile,glob;zipfile.ZipFile(glob.glob('$carry/ninja*.whl')[0]).extractall('/tmp/ninja')"
  nb=$(find /tmp/ninja -name ninja -type f -path '*bin*' | head -1); chmod +x "$nb"; export PATH=$(dirname "$nb"):$PATH
fi
ninja --version
if [ ! -d /usr/include/eigen3 ]; then
  mkdir -p /tmp/eigen && tar xJf $carry/eigen3.tar.xz -C /tmp/eigen && export CPLUS_INCLUDE_PATH=/tmp/eigen/eigen3
  echo "eigen from the carried headers"
fi
export TTT_TORCH_BUILD_DIR=/tmp/ttt_torch_ext MAX_JOBS=16
cd examples/pytorch/tests && TTT_TORCH_CUDA=1 timeout ${TORCH_TIMEOUT:-400} python3 test_cuda.py; echo "test_cuda.py rc=$?"
