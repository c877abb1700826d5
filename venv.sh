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
exec "$@"
