"""`hlkeras info`: the versions of hlkeras, Keras and every runtime, and the
active backend."""

import importlib
import platform

from hlkeras.cli.common import COMMON_FLAGS


def add_parser(commands):
    info = commands.add_parser(
        "info", parents=[COMMON_FLAGS], help="print library versions and the active Keras backend"
    )
    info.set_defaults(func=run)


def _version_of(module_name):
    try:
        return importlib.import_module(module_name).__version__
    except ImportError:
        return "not installed"


def run(args):
    import keras

    import hlkeras

    rows = [
        ("hlkeras", hlkeras.__version__),
        ("keras", keras.__version__),
        ("backend", keras.backend.backend()),
        ("python", platform.python_version()),
        ("tensorflow", _version_of("tensorflow")),
        ("jax", _version_of("jax")),
        ("torch", _version_of("torch")),
        ("keras_tuner", _version_of("keras_tuner")),
        ("tensorflow_datasets", _version_of("tensorflow_datasets")),
        ("ai_edge_litert", _litert_version()),
        ("onnx", _version_of("onnx")),
        ("onnxruntime", _version_of("onnxruntime")),
        ("tf2onnx", _version_of("tf2onnx")),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _litert_version():
    try:
        from importlib.metadata import version

        return version("ai-edge-litert")
    except Exception:
        return "not installed"
