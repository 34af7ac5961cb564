"""`hlkeras predict`: a trained model (a run directory, a `.keras` or a
`.tflite` file) on new inputs (image files, an image folder, a CSV or a
`.npz`; for a text model, texts or a CSV of texts), one row of class
probabilities per input.

A `.tflite` file runs in the LiteRT interpreter one input at a time, as a
phone runs it, and gives the same classes as the `.keras` model it came
from (`hlkeras.export` verified that per sample before writing it).

Example:

```python
from hlkeras import predict

model = predict.load_predictor("runs/vit")
names, inputs = predict.read_inputs(["digit.png"], model.input_shape)
for name, row in zip(names, predict.top_classes(model.predict(inputs), model.class_names)):
    print(name, row)
```
"""

import dataclasses
import json
import os

import numpy as np

from hlkeras import _files


class PredictError(ValueError):
    """A user mistake about a model or its inputs, in one line."""


@dataclasses.dataclass
class Predictor:
    """A model ready to predict.

    Attributes:
        input_shape: One input's shape (no batch axis).
        class_names: The class names, by class id.
        predict: Maps a float32 batch `(n, *input_shape)` to probabilities `(n, classes)`.
        tokenizer: For a text model, the `hlkeras.data.texts.Tokenizer` of its run
            (`vocabulary.json` beside the model); None otherwise.
        label, text_column: The CSV columns the run was trained with (its
            `train_config.json` beside the model), if any; else None.
    """

    input_shape: tuple
    class_names: list
    predict: callable
    tokenizer: object = None
    label: str = None
    text_column: str = None


def load_predictor(model_path):
    """A `Predictor` for a run directory (its `model.keras`), a `.keras`, a
    `.tflite` or a `.onnx` file. Class names come from `class_names.json`
    beside the model, else they are the class ids; the CSV columns from the
    run's `train_config.json` beside it."""
    path = os.fspath(model_path)
    if os.path.isdir(path):
        path = os.path.join(path, "model.keras")
    if not os.path.isfile(path):
        raise PredictError(f"MODEL {model_path}: no such file or run directory")
    extension = os.path.splitext(path)[1].lower()
    loaders = {".keras": _keras_model, ".tflite": _tflite_model, ".onnx": _onnx_model}
    if extension not in loaders:
        raise PredictError(
            f"MODEL {model_path}: expected a run directory, .keras, .tflite or .onnx"
        )
    input_shape, predict, vocabulary_size = loaders[extension](path)
    probe = predict(np.zeros((1, *input_shape), "float32"))
    class_names = _class_names(os.path.dirname(path), probe.shape[-1])
    tokenizer = None
    if vocabulary_size is not None:
        tokenizer = _tokenizer_for(path, input_shape, vocabulary_size)
    columns = _recorded_columns(os.path.dirname(path))
    return Predictor(input_shape, class_names, predict, tokenizer, **columns)


def _recorded_columns(folder):
    """The `label` and `text_column` recorded by the run whose directory
    holds the model (its `train_config.json`), if any."""
    config = os.path.join(folder, "train_config.json")
    if not os.path.isfile(config):
        return {}
    with open(config) as file:
        settings = json.load(file)
    return {"label": settings.get("label"), "text_column": settings.get("text_column")}


def _tokenizer_for(model_path, input_shape, vocabulary_size):
    """The tokenizer saved beside a text model, checked to fit it
    (`vocabulary_size` 0: unknown, as for a .tflite)."""
    from hlkeras import data
    from hlkeras.data import texts

    vocabulary = texts.vocabulary_path(model_path)
    try:
        tokenizer = texts.saved_tokenizer(model_path)
        if tokenizer is None:
            raise PredictError(
                f"MODEL {model_path}: a text model needs its {texts.VOCABULARY_FILE} "
                "(from the run directory) beside it"
            )
        size = vocabulary_size or tokenizer.vocabulary_size
        texts.check_fits(tokenizer, input_shape, size, f"the vocabulary file {vocabulary}")
    except data.DatasetError as error:
        raise PredictError(str(error)) from None
    return tokenizer


def _keras_model(path):
    import keras

    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # Keras raises many types for a bad file
        raise PredictError(f"MODEL {path}: not a loadable Keras model ({error})") from None
    input_shape = tuple(model.input_shape[1:])

    def predict(batch):
        return keras.ops.convert_to_numpy(model.predict(batch, verbose=0))

    return input_shape, predict, _embedded_vocabulary_size(model)


def _embedded_vocabulary_size(model):
    """The token ids a text model (int inputs into an `Embedding`) takes, or None."""
    import keras

    if "int" not in str(model.inputs[0].dtype):
        return None
    embeddings = [layer for layer in model.layers if isinstance(layer, keras.layers.Embedding)]
    return embeddings[0].input_dim if embeddings else None


def _tflite_model(path):
    from ai_edge_litert.interpreter import Interpreter

    from hlkeras import export

    with open(path, "rb") as file:
        flatbuffer = file.read()
    try:
        details = Interpreter(model_content=flatbuffer).get_input_details()
    except ValueError as error:
        raise PredictError(f"MODEL {path}: not a TFLite model ({error})") from None
    input_shape = tuple(int(d) for d in details[0]["shape"][1:])

    def predict(batch):
        # One input at a time, as a phone runs the file.
        return np.concatenate([export.run_tflite(flatbuffer, x[None]) for x in batch])

    # Token ids come in as integers; the file does not say its vocabulary size.
    is_text = np.issubdtype(details[0]["dtype"], np.integer) and details[0]["dtype"] != np.int8
    return input_shape, predict, 0 if is_text else None


def _onnx_model(path):
    from hlkeras import _validation
    from hlkeras.export import onnx_export

    missing = onnx_export.missing_packages()
    if missing:
        raise PredictError(
            f"MODEL {path}: needs {', '.join(missing)} ({onnx_export.ONNX_EXTRA_HINT})"
        )
    try:
        session = onnx_export.new_session(path)
    except Exception as error:  # ONNX Runtime raises its own types for a bad file
        raise PredictError(
            f"MODEL {path}: not an ONNX model ({_validation.first_line(error)})"
        ) from None
    model_input = session.get_inputs()[0]
    if not all(isinstance(d, int) for d in model_input.shape[1:]):
        raise PredictError(
            f"MODEL {path}: its input has a variable shape {model_input.shape}; "
            "predict needs a fixed one (export the model with a fixed input shape)"
        )
    input_shape = tuple(model_input.shape[1:])
    run = onnx_export.session_predictor(session)

    def predict(batch):
        # One input at a time, as for a .tflite.
        return np.concatenate([run(x[None]) for x in batch])

    is_text = model_input.type in ("tensor(int32)", "tensor(int64)")
    return input_shape, predict, 0 if is_text else None


def read_texts(inputs, tokenizer, text_column="text"):
    """`(names, batch)` for a text model: each input is a CSV file (its
    `text_column`, one input per row) or else a text itself."""
    from hlkeras import data
    from hlkeras.data import texts

    names, values = [], []
    for item in map(str, inputs):
        if item.lower().endswith(".csv") and os.path.isfile(item):
            try:
                found, _ = texts.read_text_csv(item, text_column, None, where=f"INPUT {item}")
            except data.DatasetError as error:
                raise PredictError(str(error)) from None
            names += [f"{item}:{line}" for line in range(2, len(found) + 2)]
            values += found
        else:
            names.append(item)
            values.append(item)
    return names, tokenizer(values).astype("float32")


def _class_names(folder, num_classes):
    path = os.path.join(folder, "class_names.json")
    if os.path.exists(path):
        with open(path) as file:
            names = json.load(file)
        if len(names) == num_classes:
            return [str(name) for name in names]
    return [str(i) for i in range(num_classes)]


def read_inputs(paths, input_shape, label="label"):
    """`(names, batch)`: the inputs at `paths` as a float32 batch for a model
    taking `input_shape`. Image files and folders are read and resized like
    the training images; a CSV gives one input per row (without its `label`
    column); a `.npz` its array `x`."""
    names, arrays = [], []
    for path in map(os.fspath, paths):
        if not os.path.exists(path):
            raise PredictError(f"INPUT {path}: no such file or folder")
        found_names, batch = _read_one(path, input_shape, label)
        if batch.shape[1:] != tuple(input_shape):
            raise PredictError(
                f"INPUT {path}: each input has shape {batch.shape[1:]}, "
                f"the model takes {tuple(input_shape)}"
            )
        names += found_names
        arrays.append(batch)
    return names, np.concatenate(arrays)


def _read_one(path, input_shape, label):
    from hlkeras import data

    extension = os.path.splitext(path)[1].lower()
    if os.path.isdir(path) or extension in data.IMAGE_EXTENSIONS:
        files = data.images.image_files(path, recursive=True) if os.path.isdir(path) else [path]
        if not files:
            raise PredictError(f"INPUT {path}: no images in the folder")
        if len(input_shape) != 3:
            raise PredictError(
                f"INPUT {path}: images, but the model takes inputs of shape {tuple(input_shape)}"
            )
        try:
            images = data.read_images(files, tuple(input_shape))
        except data.DatasetError as error:
            raise PredictError(f"INPUT {error}") from None
        return files, images.astype("float32") / 255.0
    if extension == ".csv":
        return _read_csv_rows(path, label)
    if extension == ".npz":
        return _read_npz_rows(path, input_shape)
    raise PredictError(f"INPUT {path}: expected image files, an image folder, a .csv or a .npz")


def _read_npz_rows(path, input_shape):
    from hlkeras.data import tables

    try:
        arrays = tables.read_npz(path, f"INPUT {path}")
        x = arrays.get("x")
        if x is None or x.dtype.kind not in "biuf":
            what = f"found {sorted(arrays)}" if x is None else f"its 'x' holds {x.dtype}"
            raise PredictError(f"INPUT {path}: needs a numeric array 'x'; {what}")
        x = x.astype("float32") / 255.0 if x.dtype == np.uint8 else x.astype("float32")
        tables.check_finite_array(x, f"INPUT {path}", "x")
    except tables.DatasetError as error:
        raise PredictError(str(error)) from None
    if x.ndim == len(input_shape) and len(input_shape) == 3 and input_shape[-1] == 1:
        x = x[..., None]  # (n, height, width) grayscale images
    return [f"{path}[{i}]" for i in range(len(x))], x


def _read_csv_rows(path, label):
    from hlkeras.data import tables

    where = f"INPUT {path}"
    header = None
    try:
        rows = tables.read_csv_rows(path, where)
        if len(rows) < 2:
            raise PredictError(f"{where}: the CSV file has no rows")
        header = [name.strip() for name in rows[0][1]]
        columns = [i for i, name in enumerate(header) if name != label]
        features = tables.csv_features(header, rows[1:], columns, where)
    except tables.DatasetError as error:
        unlabelled = header is not None and label not in header
        hint = f" (no label column {label!r} to skip: pass --label COL)" if unlabelled else ""
        raise PredictError(f"{error}{hint}") from None
    return [f"{path}:{line}" for line, _ in rows[1:]], features


def top_classes(probabilities, class_names, k=1):
    """The `k` most probable `(class name, probability)` pairs of each row."""
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return [
        [(class_names[c], float(row[c])) for c in top] for row, top in zip(probabilities, order)
    ]


def write_csv(path, names, tops):
    """One row per input: `input`, then `class_i`, `probability_i` for each rank."""
    import csv
    import io

    k = len(tops[0]) if tops else 1
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["input"] + [f"{field}_{i + 1}" for i in range(k) for field in ("class", "probability")]
    )
    for name, top in zip(names, tops):
        writer.writerow([name] + [value for pair in top for value in (pair[0], f"{pair[1]:.6f}")])
    _files.atomic_write_text(path, buffer.getvalue())
