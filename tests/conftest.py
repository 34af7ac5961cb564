"""Shared pytest setup: backend markers, seeding and a clean Keras state."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()


def pytest_configure(config):
    print(f"\nhlkeras tests on KERAS_BACKEND={BACKEND}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("backends")
        if marker and BACKEND not in marker.args:
            reason = (
                f"needs the {' or '.join(marker.args)} backend; "
                f"running on {BACKEND}"
            )
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def clean_keras_state():
    keras.utils.set_random_seed(1234)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
