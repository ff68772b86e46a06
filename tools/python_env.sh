#!/usr/bin/env bash
# The Python side of the tests (a real WebSocket client on Kyutai's sphn, the PyTorch
# extension): a virtual environment that sees the distribution's packages (Debian's
# python3-torch) plus what tools/requirements.txt pins from PyPI. Idempotent: it does nothing
# when the requirements have not changed since the last run. Offline, it warns and exits 0: the
# tests that need a missing module then report "skipped" and say why.
#   tools/python_env.sh          -> prints nothing, or what it installed
#   TTT_VENV=DIR                 -> where the environment lives (default ~/.cache/ttt/venv)
# CMake picks the environment's python (TTT_PYTHON) when it exists.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${TTT_VENV:-$HOME/.cache/ttt/venv}
req=$root/tools/requirements.txt
[ -f "$req" ] || exit 0
# The distribution's interpreter when there is one: only it sees the distribution's packages
# (python3-torch); a pyenv or conda python3 first on PATH would make every torch test skip.
py=/usr/bin/python3
[ -x "$py" ] || py=$(command -v python3 || echo python3)
# An environment made from another interpreter is made again.
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.ttt-python" 2>/dev/null)" != "$py" ]; then
  echo "python_env: remaking $venv from $py" >&2
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$(dirname "$venv")"
  if "$py" -m venv --system-site-packages "$venv" >/dev/null 2>&1; then
    echo "$py" > "$venv/.ttt-python"
  else
    echo "python_env: could not create $venv (python3-venv missing?); Python tests will skip" >&2
    rm -rf "$venv"
    exit 0
  fi
fi
# tools/requirements-nodeps.txt: packages installed without their declared dependencies (Kyutai's
# moshi declares torch >= 2.2, which would pull PyPI's 3.8 GB CUDA torch over Debian's; the tests
# run its LMModel on Debian's torch 1.13, examples/pytorch/tests/common.py says how).
nodeps=$root/tools/requirements-nodeps.txt
stamp=$venv/.ttt-requirements
want=$(cat "$req" "$nodeps" 2>/dev/null)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "python_env: installing $(cat "$req" "$nodeps" 2>/dev/null | grep -cv '^\s*\(#\|$\)') packages from tools/requirements*.txt into $venv" >&2
if "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2 &&
   { [ ! -f "$nodeps" ] || "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$nodeps" >&2; }; then
  printf '%s' "$want" > "$stamp"
else
  echo "python_env: pip install failed (offline?); the Python tests that need these packages will skip" >&2
fi
