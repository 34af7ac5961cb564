"""Shared pytest setup: backend markers, seeding and a clean Keras state."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite is bound by XLA compile time (every JAX test, TensorFlow's
# jit-compiled fits), not by run time: XLA's backend optimization level 0
# compiles enough faster that tests/layers/test_moe.py and test_attention.py
# take 67 s instead of 97 s on JAX here, with the same results. Set before
# Keras imports a backend, so subprocesses inherit it; users' runs keep
# XLA's default.
os.environ["XLA_FLAGS"] = " ".join(
    flag for flag in (os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0") if flag
)

# Each xdist worker computes on one thread: two workers with a pool of two
# threads each oversubscribe the two cores (torch measured 16x slower per
# step that way). Set before the backends start their thread pools.
ONE_THREAD_PER_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if ONE_THREAD_PER_WORKER:
    os.environ.update(OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1", MKL_NUM_THREADS="1")
    os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

import keras  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()
if ONE_THREAD_PER_WORKER and BACKEND == "torch":
    import torch

    torch.set_num_threads(1)


def pytest_configure(config):
    print(f"\nhlkeras tests on KERAS_BACKEND={BACKEND}")


# End-to-end tests (marked `slow`: subprocesses, training runs, exports,
# searches) run on this backend only, unless a `backends` marker names the
# backends where their behaviour differs. Layer and unit tests run on all.
END_TO_END_BACKEND = "tensorflow"


def _skip_reason(item):
    marker = item.get_closest_marker("backends")
    if marker and BACKEND not in marker.args:
        return f"needs the {' or '.join(marker.args)} backend; running on {BACKEND}"
    if not marker and item.get_closest_marker("slow") and BACKEND != END_TO_END_BACKEND:
        return (
            f"end-to-end test: runs on the {END_TO_END_BACKEND} backend only "
            "(its behaviour does not differ by backend)"
        )
    if not marker and item.get_closest_marker("neutral") and BACKEND != END_TO_END_BACKEND:
        return (
            f"backend-neutral test (argument checks, files, pure Python): runs once, "
            f"on the {END_TO_END_BACKEND} backend"
        )
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = _skip_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def clean_keras_state():
    keras.utils.set_random_seed(1234)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
    # Without the full gc.collect() of the default: over the suite's ~480k
    # objects it took 0.28 s per test, about 8 CPU-minutes of CI (Keras' own
    # TestCase clears the same way). Python's generational gc still runs.
    keras.backend.clear_session(free_memory=False)
