#!/usr/bin/env bash
# Runs a command inside .venv, creating it and installing requirements.txt first if needed.
#   ./venv.sh dvc repro
#   ./venv.sh python -m pytest
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ] || ! cmp -s requirements.txt .venv/requirements.txt; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -r requirements.txt
  cp requirements.txt .venv/requirements.txt
fi
export PATH="$PWD/.venv/bin:$PATH"
# Two `dvc exp run` at once in one workspace break both (DVC 3.67; README, "The loop"): refuse the second
running=.dvc/tmp/exps/run/workspace/workspace.json
if [ "${1-} ${2-} ${3-}" = "dvc exp run" ] && [ -f "$running" ]; then
  pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$running")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    echo "error: another dvc exp run (PID $pid) is running in this workspace: wait for it, or run experiments" \
         "side by side with dvc exp run --queue, dvc exp run --temp or python -m stages.study" >&2
    exit 2
  fi
fi
exec "$@"
