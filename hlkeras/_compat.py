"""Every use of a private Keras or LiteRT API, each behind one function.

Upstream can change a private name in any release. Keeping each use here,
with a docstring saying what the public API lacks and a test in
`tests/test_compat.py` that fails loudly when upstream changes it, means a
Keras or LiteRT upgrade breaks one known place instead of silently breaking
a feature.
"""


def sublayers(layer, include_self=False):
    """Every layer nested in `layer`, depth-first, in tracking order.

    Keras 3 has no public recursive sublayer walk: `Model.layers` lists only
    the top level, and a `TransformerBlock`'s FFN or a nested model's layers
    are below it. Keras itself (`Model.metrics`, `Model.layers`) and
    KerasHub use `Layer._flatten_layers` for this.
    """
    return list(layer._flatten_layers(include_self=include_self, recursive=True))


def is_graph_model(model):
    """Whether `model` is a functional or Sequential model (it has an op graph
    that `keras.models.clone_model` can rebuild); there is no public flag.
    """
    import keras

    return isinstance(model, keras.Sequential) or hasattr(model, "_operations")


def tflite_op_details(interpreter):
    """The `{"op_name": ..., ...}` dicts of every op in a LiteRT interpreter.

    `ai_edge_litert.interpreter.Interpreter` has no public op listing; its
    `_get_ops_details` is what TensorFlow's own TFLite tooling uses.
    """
    return interpreter._get_ops_details()
