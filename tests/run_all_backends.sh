#!/usr/bin/env bash
# Runs the whole test suite once per Keras backend, on both cores
# (pytest-xdist, one test file per worker so module fixtures are built once),
# the `serial` tests alone before that (in the TensorFlow pass), prints each
# backend's duration, and fails if any run fails.
# Usage: bash tests/run_all_backends.sh [extra pytest args]
# PYTHON picks the interpreter (default: the project's .venv).
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
status=0
serial_files=$(grep -l "pytest.mark.serial" tests/test_*.py tests/*/test_*.py)
durations=""
for backend in tensorflow jax torch; do
  echo "=== KERAS_BACKEND=$backend ==="
  start=$SECONDS
  # The chief/worker tests time their subprocesses (gRPC polling, two
  # processes training one model): they run alone, without a second worker
  # competing for the two cores. (The kill -9 tests kill at a chosen batch,
  # tests/kill_at_batch.py, and run in parallel.)
  # Only the files that hold serial tests are collected: collecting the whole
  # suite to select two tests took 14-17 s per backend.
  # They run in the TensorFlow pass only (conftest.py refuses a serial test
  # that does not): their subprocesses set their own KERAS_BACKEND, and a
  # session that skips them all still takes 10-15 s to start.
  if [ "$backend" = tensorflow ]; then
    KERAS_BACKEND=$backend "$PYTHON" -m pytest $serial_files -m serial "$@" || status=1
  fi
  # Per-test durations of the parallel run, for keeping the suite in budget
  # (tests/README.md): test-reports/<backend>.xml.
  KERAS_BACKEND=$backend "$PYTHON" -m pytest tests -n 2 --dist loadfile -m "not serial" \
    --junitxml "test-reports/$backend.xml" "$@" || status=1
  durations="$durations $backend=$((SECONDS - start))s"
done
echo "=== durations:$durations"
exit $status
