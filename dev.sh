#!/usr/bin/env bash
# Fresh-machine entry points; each installs what it needs into ./.venv first.
#   ./dev.sh train [run_train.sh args]   train the debug model (offline, CPU or GPU)
#   ./dev.sh test  [pytest args]         run the test suite
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
if [[ ! -x $VENV/bin/python ]]; then
  python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
if ! "$PY" -c 'import titan_linear' >/dev/null 2>&1; then
  "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      "$PY" -m pip install -q 'torch>=2.11,<2.15'
    else
      # The CPU build this project is tested with.
      "$PY" -m pip install -q torch==2.13.0
    fi
  fi
  "$PY" -m pip install -q -e '.[test]'
fi

cmd=${1:-}
[[ $# -gt 0 ]] && shift
case $cmd in
  train) PYTHON=$PY exec ./run_train.sh "$@" ;;
  test) exec "$PY" -m pytest -q "$@" ;;
  *) echo "usage: ./dev.sh {train|test} [args]" >&2; exit 2 ;;
esac
