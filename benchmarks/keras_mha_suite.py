"""Keras' own MultiHeadAttention tests, run against hlkeras' class.

The oracle for "drop-in": `keras/src/layers/attention/multi_head_attention_test.py`,
as shipped in the installed keras wheel, runs with `keras.layers.MultiHeadAttention`
replaced by `hlkeras.layers.MultiHeadAttention` (a conftest patches the name
before the test module imports it). Prints the pass count and every failure.

    KERAS_BACKEND=jax python benchmarks/keras_mha_suite.py [--reference]

`--reference` runs the same file against Keras' own class, for comparison.
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import keras

KERAS_TEST_FILE = (
    pathlib.Path(keras.__file__).parent / "src/layers/attention/multi_head_attention_test.py"
)
PATCH_CONFTEST = """
import keras.src.layers
import hlkeras.layers

keras.src.layers.MultiHeadAttention = hlkeras.layers.MultiHeadAttention
"""


def run_suite(reference=False):
    """Runs the Keras test file; returns pytest's exit code."""
    with tempfile.TemporaryDirectory() as directory:
        shutil.copy(KERAS_TEST_FILE, directory)
        if not reference:
            pathlib.Path(directory, "conftest.py").write_text(PATCH_CONFTEST)
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rfE",
            "--no-header",
            "-W",
            "ignore::DeprecationWarning",
            os.path.join(directory, KERAS_TEST_FILE.name),
        ]
        return subprocess.call(command, cwd=directory)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", action="store_true", help="run Keras' own class")
    args = parser.parse_args()
    print(
        f"backend={keras.backend.backend()} class="
        + ("keras" if args.reference else "hlkeras")
        + f" tests={KERAS_TEST_FILE}",
        flush=True,
    )
    sys.exit(run_suite(args.reference))


if __name__ == "__main__":
    main()
