"""Text classification data: a `Tokenizer` (Keras `TextVectorization` with a
vocabulary built on the training split, saved in the run directory), and the
texts of a CSV column or of a TFDS text dataset.

Tokenization happens before the model, in NumPy/tf.data, so a text model
takes int32 token ids (0 is padding, 1 an unknown word): it stays
backend-neutral and exports to TFLite with builtin ops only.
"""

import json
import math
import os

import numpy as np

from hlkeras import _files
from hlkeras.data.tables import DatasetError
from hlkeras.data.tables import read_csv_rows

VOCABULARY_FILE = "vocabulary.json"
# Lowercase, strip punctuation, split on whitespace (Keras' default).
STANDARDIZE = "lower_and_strip_punctuation"
# The default padded length covers this share of the training texts, so a
# few very long texts do not make every batch long.
LENGTH_QUANTILE = 0.95
MAX_DEFAULT_LENGTH = 512
# Ids 0 (padding) and 1 (an unknown word) come before the vocabulary's.
RESERVED_IDS = 2


class Tokenizer:
    """Words to padded int32 token ids, the same way at training and at
    prediction time.

    Args:
        vocabulary: Sequence of tokens, most frequent first, without the
            padding and unknown tokens (ids 0 and 1); token `i` gets id `i + 2`.
        max_length: Positive int, the padded (or truncated) length.

    Example:

    >>> tokenizer = Tokenizer(["the", "cat"], max_length=4)
    >>> tokenizer(["The cat, the dog"]).tolist()
    [[2, 3, 2, 1]]
    """

    def __init__(self, vocabulary, max_length):
        import keras

        self.vocabulary = tuple(str(token) for token in vocabulary)
        self.max_length = int(max_length)
        self._layer = keras.layers.TextVectorization(
            standardize=STANDARDIZE,
            output_sequence_length=self.max_length,
            vocabulary=list(self.vocabulary) or None,
        )

    @property
    def vocabulary_size(self):
        """Token ids are in `[0, vocabulary_size)`: the model's embedding size."""
        return len(self.vocabulary) + RESERVED_IDS

    @classmethod
    def fit(cls, texts, *, max_tokens=20_000, max_length=None):
        """A tokenizer whose vocabulary is the `max_tokens - 2` most frequent
        words of `texts`; `max_length` defaults to the length that covers
        95% of them (at most 512)."""
        import keras

        layer = keras.layers.TextVectorization(max_tokens=max_tokens, standardize=STANDARDIZE)
        layer.adapt(np.asarray(texts, dtype=object))
        vocabulary = layer.get_vocabulary(include_special_tokens=False)
        if max_length is None:
            # Without output_sequence_length the ids are padded to the longest.
            lengths = np.count_nonzero(np.asarray(layer(np.asarray(texts, dtype=object))), axis=-1)
            max_length = min(
                MAX_DEFAULT_LENGTH, max(1, math.ceil(np.quantile(lengths, LENGTH_QUANTILE)))
            )
        return cls(vocabulary, max_length)

    def __call__(self, texts):
        """int32 `(len(texts), max_length)` token ids."""
        ids = self._layer(np.asarray(list(texts), dtype=object))
        return np.asarray(ids).astype("int32")

    def save(self, path):
        """Writes the vocabulary and the max length to `path` (JSON, atomically)."""

        _files.atomic_write_json(
            path, {"max_length": self.max_length, "vocabulary": list(self.vocabulary)}
        )

    @classmethod
    def load(cls, path):
        try:
            with open(path) as file:
                saved = json.load(file)
            return cls(saved["vocabulary"], saved["max_length"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DatasetError(f"cannot read the vocabulary file {path}: {error}") from None


def check_max_length(max_length):
    if max_length is not None and (isinstance(max_length, bool) or max_length < 1):
        raise DatasetError(f"--max-length must be >= 1, got {max_length}")
    return max_length


def read_text_csv(path, text_column, label, where=None):
    """`(texts, labels)` as string lists from the `text_column` and `label`
    columns of the CSV at `path` (`label` None: texts only, labels None).
    Errors start with `where` (default `--data PATH`)."""
    where = where or f"--data {path}"
    found = read_csv_rows(path, where)
    columns = found[0][1] if found else []
    for name, flag in ((text_column, "--text-column"), (label, "--label")):
        if name is not None and name not in columns:
            raise DatasetError(
                f"{where}: no column {name!r} ({flag} COL); the columns are {columns}"
            )
    # As csv.DictReader reads them: a short row's missing cells are None.
    rows = [
        dict(zip(columns, cells + [None] * (len(columns) - len(cells)))) for _, cells in found[1:]
    ]
    if not rows:
        raise DatasetError(f"{where}: the CSV file has no rows")
    texts = [(row[text_column] or "").strip() for row in rows]
    if not any(texts):
        raise DatasetError(f"{where}: every text in column {text_column!r} is empty")
    return texts, None if label is None else [row[label] for row in rows]


def vocabulary_path(model_path):
    """The vocabulary file of a run directory or beside a model file."""
    model_path = os.fspath(model_path)
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    return os.path.join(folder or ".", VOCABULARY_FILE)


def saved_tokenizer(model_path):
    """The `Tokenizer` saved in a run directory or beside a model file, or
    None when there is no vocabulary file."""
    path = vocabulary_path(model_path)
    return Tokenizer.load(path) if os.path.exists(path) else None


def check_fits(tokenizer, model_input_shape, model_vocabulary_size, where):
    """Raises when `tokenizer` does not make the ids the model takes."""
    if tuple(model_input_shape) != (tokenizer.max_length,):
        raise DatasetError(
            f"{where}: pads texts to {tokenizer.max_length} tokens but the model takes "
            f"inputs of shape {tuple(model_input_shape)}"
        )
    if model_vocabulary_size != tokenizer.vocabulary_size:
        raise DatasetError(
            f"{where}: has {tokenizer.vocabulary_size} token ids but the model embeds "
            f"{model_vocabulary_size}; it belongs to another model"
        )
