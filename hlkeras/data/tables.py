"""Reading a user's tables: the CSV reader (`read_csv_rows`, `csv_features`)
and the checks that refuse NaN and infinity where data enters, with
`DatasetError`, the error every data module raises. `hlkeras.data` (tables,
`.npz`, TFDS) and `hlkeras.data.texts` (text CSVs) both read through it.
No TensorFlow here."""

import zipfile

import numpy as np

from hlkeras import _validation


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message says what to do."""


MISSING_VALUES_HINT = "fill or drop missing values first"


def read_csv_rows(path, where):
    """The non-blank rows of the CSV file at `path` as `(line, cells)` pairs,
    `line` as an editor numbers it; errors start with `where`.

    A file that is not UTF-8 text (a binary file named `.csv`, a
    spreadsheet saved in another encoding) is a `DatasetError` naming the
    file. A UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped.
    """
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            return [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{where}: not a UTF-8 text CSV file (it holds the byte "
            f"{error.object[error.start : error.start + 1]!r}); save it as UTF-8 CSV"
        ) from None
    except csv.Error as error:
        raise DatasetError(f"{where}: not a readable CSV file ({error})") from None


def csv_features(header, body, feature_columns, where):
    """float32 features `(rows, columns)` from the CSV `body` (`(line, cells)`
    pairs of `read_csv_rows`) at the `feature_columns` indices of `header`:
    every row has the header's fields, every feature is a finite number."""
    features = np.empty((len(body), len(feature_columns)), "float32")
    for r, (line, row) in enumerate(body):
        if len(row) != len(header):
            raise DatasetError(
                f"{where}: line {line} has {len(row)} fields, the header {len(header)}"
            )
        for c, column in enumerate(feature_columns):
            features[r, c] = _csv_number(row[column], where, header[column], line)
    names = [header[column] for column in feature_columns]
    check_finite_table(features, where, names, [line for line, _ in body])
    return features


def _csv_number(cell, where, column, line):
    try:
        return float(cell)
    except ValueError:
        if not cell.strip():
            raise DatasetError(
                f"{where}: column {column!r} is empty at line {line}; {MISSING_VALUES_HINT}"
            ) from None
        raise DatasetError(
            f"{where}: feature column {column!r} is not numeric "
            f"(line {line}: {cell!r}); only numeric features are supported"
        ) from None


def check_finite_table(features, where, columns, lines):
    """Refuses a NaN or infinity in float `features` `(rows, columns)` read
    from a CSV, naming the column and line (`lines[r]` of row r). A value
    beyond float32's range (e.g. 1e39) reads as inf and is refused too."""
    found = _validation.first_non_finite(features)
    if found is not None:
        (row, column), what = found
        raise DatasetError(
            f"{where}: column {columns[column]!r} has {what} at line {lines[row]}; "
            f"{MISSING_VALUES_HINT}"
        )


def check_finite_array(array, where, name):
    """Refuses a NaN or infinity in float `array` (samples first), naming
    the array, the sample and the value's index."""
    found = _validation.first_non_finite(array)
    if found is not None:
        index, what = found
        subject = f"array {name!r}" if name else "the array"
        raise DatasetError(
            f"{where}: {subject} has {what} in sample {index[0]} (at index "
            f"{list(index)}); {MISSING_VALUES_HINT}"
        )


def labels_to_ids(values, where):
    """Class ids for label values (ints sort numerically, strings by name)."""
    values = [str(v).strip() for v in values]
    if not values:
        raise DatasetError(f"{where}: no examples")
    unique = sorted(set(values))
    try:
        unique = sorted(unique, key=int)
    except ValueError:
        pass
    if len(unique) < 2:
        raise DatasetError(
            f"{where}: only one class ({unique[0]!r}); classification needs at least two"
        )
    index = {name: i for i, name in enumerate(unique)}
    return np.asarray([index[v] for v in values], "int32"), unique


def read_npz(path, where):
    """Every array of the `.npz` file at `path`, by name (no pickles)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{where}: cannot read a NumPy .npz file ({error})") from None
    if isinstance(loaded, np.ndarray):  # np.load reads a .npy as one array
        raise DatasetError(
            f"{where}: is one NumPy array (.npy), not a .npz archive of named arrays; "
            "write it with np.savez(path, x=..., y=...)"
        )
    with loaded as arrays:
        return {name: arrays[name] for name in arrays.files}
