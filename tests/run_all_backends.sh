#!/usr/bin/env bash
# Runs the whole test suite once per Keras backend and fails if any run fails.
# Usage: bash tests/run_all_backends.sh [extra pytest args]
# PYTHON picks the interpreter (default: the project's .venv).
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
status=0
for backend in tensorflow jax torch; do
  echo "=== KERAS_BACKEND=$backend ==="
  KERAS_BACKEND=$backend "$PYTHON" -m pytest tests "$@" || status=1
done
exit $status
