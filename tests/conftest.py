"""Shared pytest setup: backend markers, seeding and a clean Keras state."""

import functools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The JAX pass is bound by XLA compile time, not by run time (TensorFlow
# fits run without XLA on a CPU-only machine). Most of it is eager ops: each
# op on a new shape compiles a program of its own, 25-40 ms here (1,110 of
# them in tests/layers/test_moe.py, against 10 train steps). Flags that
# compile faster, with the same results:
# - backend optimization level 0: test_moe.py and test_attention.py took
#   67 s instead of 97 s on JAX;
# - XLA:CPU's older loop emitters instead of its fusion emitters, and no
#   expensive LLVM passes: test_moe.py took 37-43 s instead of 61-65 s.
# Set before Keras imports a backend, so subprocesses inherit them; users'
# runs keep XLA's defaults.
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_llvm_disable_expensive_passes=true",
)
os.environ["XLA_FLAGS"] = " ".join(
    flag for flag in (os.environ.get("XLA_FLAGS"), *FAST_COMPILE_FLAGS) if flag
)

# Each xdist worker computes on one thread: two workers with a pool of two
# threads each oversubscribe the two cores (torch measured 16x slower per
# step that way). Set before the backends start their thread pools.
ONE_THREAD_PER_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if ONE_THREAD_PER_WORKER:
    os.environ.update(OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1", MKL_NUM_THREADS="1")
    # (Only `--` flags: XLA's parser stops at a bare token, and the flags a
    # subprocess appends after one, e.g. the host device count, are lost.)
    os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"

# Hermetic TFDS: each test process (xdist worker) prepares the embedded
# digits in a directory of its own, never in the user's
# ~/tensorflow_datasets, and two workers never prepare one directory at
# once. Subprocesses inherit it; it is removed when the process exits.
if "TFDS_DATA_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="hlkeras-tests-tfds-")
    atexit.register(shutil.rmtree, os.environ["TFDS_DATA_DIR"], ignore_errors=True)

import pytest  # noqa: E402


@functools.cache
def backend():
    """This process' Keras backend (imports Keras and the backend)."""
    import keras

    return keras.backend.backend()


def _is_xdist_controller(config):
    """The process that hands tests to xdist workers and runs none itself."""
    distributed = getattr(config.option, "numprocesses", None)
    return bool(distributed) and not ONE_THREAD_PER_WORKER and not config.option.collectonly


def pytest_configure(config):
    if _is_xdist_controller(config):
        # It collects and runs no test: importing Keras and its backend here
        # took 8.5 s per pytest run (torch), before any worker started.
        name = os.environ.get("KERAS_BACKEND", "unset (Keras' config decides)")
        print(f"\nhlkeras tests on KERAS_BACKEND={name}")
        return
    if ONE_THREAD_PER_WORKER and backend() == "torch":
        import torch

        torch.set_num_threads(1)
    print(f"\nhlkeras tests on KERAS_BACKEND={backend()}")


# End-to-end tests (marked `slow`: subprocesses, training runs, exports,
# searches) run on this backend only, unless a `backends` marker names the
# backends where their behaviour differs. Layer and unit tests run on all.
END_TO_END_BACKEND = "tensorflow"


def _allowed_backends(item):
    """The backends every `backends` marker of `item` names, or None without
    one. All of them, not the closest: a parameter's marks come after its
    function's (`heavy`'s every backend), so the closest would ignore them."""
    markers = list(item.iter_markers("backends"))
    if not markers:
        return None
    return [name for name in markers[0].args if all(name in m.args for m in markers)]


# tests/run_all_backends.sh runs the serial tests in the TensorFlow pass
# only (a session of its own costs 10-15 s to start); their subprocesses
# pick their own backends.
SERIAL_BACKEND = END_TO_END_BACKEND


def _check_serial(item):
    allowed = _allowed_backends(item)
    if item.get_closest_marker("serial") and allowed is not None and SERIAL_BACKEND not in allowed:
        raise pytest.UsageError(
            f"{item.nodeid} is `serial` but does not run on {SERIAL_BACKEND}, the only "
            "pass with a serial session: mark it backends('tensorflow') and set its "
            "subprocesses' KERAS_BACKEND"
        )


def _skip_reason(item):
    marker = _allowed_backends(item)
    if marker is not None and backend() not in marker:
        return f"needs the {' or '.join(marker)} backend; running on {backend()}"
    if marker is None and item.get_closest_marker("slow") and backend() != END_TO_END_BACKEND:
        return (
            f"end-to-end test: runs on the {END_TO_END_BACKEND} backend only "
            "(its behaviour does not differ by backend)"
        )
    if marker is None and item.get_closest_marker("neutral") and backend() != END_TO_END_BACKEND:
        return (
            f"backend-neutral test (argument checks, files, pure Python): runs once, "
            f"on the {END_TO_END_BACKEND} backend"
        )
    return None


@pytest.fixture(autouse=True)
def clean_keras_state():
    import keras

    keras.utils.set_random_seed(1234)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
    # Without the full gc.collect() of the default: over the suite's ~480k
    # objects it took 0.28 s per test, about 8 CPU-minutes of CI (Keras' own
    # TestCase clears the same way). Python's generational gc still runs.
    keras.backend.clear_session(free_memory=False)


# A test not marked `slow` must stay a unit test: its own call (fixtures
# excluded, they are shared) fails past this many seconds of CPU time, so
# the suite's time cannot creep up unnoticed (tests/README.md states the
# budget). CPU time of this process, not wall time: the machine is shared,
# and a busy neighbour must not fail a test (subprocess work is in `slow`
# tests anyway).
UNIT_TEST_SECONDS = 10.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    start = time.process_time()
    yield
    item.call_cpu_seconds = time.process_time() - start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seconds = getattr(item, "call_cpu_seconds", 0.0)
    too_slow = call.when == "call" and report.passed and seconds > UNIT_TEST_SECONDS
    if too_slow and not item.get_closest_marker("slow"):
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} took {seconds:.1f} CPU seconds, more than the "
            f"{UNIT_TEST_SECONDS:g} s a test not marked `slow` may take: make it smaller, share "
            "its work through a fixture, or mark it `slow` and say what it costs "
            "(tests/README.md)"
        )


# Heaviest files first: `--dist loadfile` hands whole files to the workers
# in collection order, so a long file collected last would run alone at the
# end. tests/durations.json holds each file's seconds per backend, from a
# run's test-reports/<backend>.xml (tests/README.md says how to refresh it).
DURATIONS_FILE = os.path.join(os.path.dirname(__file__), "durations.json")


def _file_seconds():
    import json

    if not os.path.exists(DURATIONS_FILE):
        return {}
    with open(DURATIONS_FILE) as file:
        return json.load(file).get(backend(), {})


def pytest_collection_modifyitems(config, items):
    for item in items:
        _check_serial(item)
        reason = _skip_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
    seconds = _file_seconds()
    order = {item: index for index, item in enumerate(items)}
    items.sort(key=lambda item: (-seconds.get(item.location[0], 0.0), order[item]))
