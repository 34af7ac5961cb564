"""The CLI's bad-input table: for each command, malformed files and flags.

Each case must exit 2 with one line on stderr that starts with
`hlkeras <command>: error:` and names the argument or file, print no
traceback, and leave every file the user had as it was, writing none.
Every case fails before any training or conversion, so the table is fast;
the commands run in-process (`hlkeras.cli.main`), which is backend-neutral
argument and data handling: it runs on TensorFlow only.
"""

import hashlib

import keras
import numpy as np
import pytest

from hlkeras import cli

pytestmark = pytest.mark.backends("tensorflow")
CSV_HEADER = "a,b,label\n"


def _table(rows):
    return CSV_HEADER + "".join(f"{r}\n" for r in rows)


GOOD_ROWS = [f"{i},{i % 3},{'xy'[i % 2]}" for i in range(12)]


def _files(root):
    """The user's files every case may point at."""
    (root / "good.csv").write_text(_table(GOOD_ROWS))
    (root / "nan.csv").write_text(_table(GOOD_ROWS[:6] + ["1,nan,x"] + GOOD_ROWS[6:]))
    (root / "inf.csv").write_text(_table(GOOD_ROWS[:2] + ["inf,1,y"] + GOOD_ROWS[2:]))
    (root / "hole.csv").write_text(_table(GOOD_ROWS[:4] + ["1,,y"] + GOOD_ROWS[4:]))
    (root / "binary.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    (root / "ragged.csv").write_text(_table(GOOD_ROWS[:3] + ["1,2"] + GOOD_ROWS[3:]))
    x = np.arange(24, dtype="float32").reshape(12, 2)
    np.savez(root / "good.npz", x=x, y=np.arange(12) % 2)
    x_nan = x.copy()
    x_nan[5, 1] = np.nan
    np.savez(root / "nan.npz", x=x_nan, y=np.arange(12) % 2)
    np.savez(root / "strings.npz", x=np.array(["a", "b"]), y=np.arange(2))
    (root / "broken.npz").write_bytes(b"PK\x03\x04 not a zip")
    np.save(root / "nan.npy", x_nan)
    (root / "broken.onnx").write_bytes(b"not an onnx file")
    (root / "model.h5").write_bytes(b"")
    inputs = keras.Input((2,))
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs)).save(
        root / "model.keras"
    )


# (command line, fragments of the one error line); {d} is the files' folder.
CASES = [
    # train
    ("train --data {d}/nan.csv --out {d}/run", ["{d}/nan.csv", "column 'b' has a NaN at line 8"]),
    ("train --data {d}/inf.csv --out {d}/run", ["{d}/inf.csv", "column 'a' has inf at line 4"]),
    ("train --data {d}/hole.csv --out {d}/run", ["column 'b' is empty at line 6"]),
    ("train --data {d}/binary.csv --out {d}/run", ["{d}/binary.csv", "not a UTF-8 text CSV"]),
    ("train --data {d}/ragged.csv --out {d}/run", ["line 5 has 2 fields, the header 3"]),
    ("train --data {d}/nan.npz --out {d}/run", ["{d}/nan.npz", "array 'x' has a NaN in sample 5"]),
    ("train --data {d}/broken.npz --out {d}/run", ["{d}/broken.npz", "cannot read"]),
    ("train --data {d}/good.csv --label kind --out {d}/run", ["no label column 'kind'"]),
    ("train --data {d}/missing.csv --out {d}/run", ["{d}/missing.csv", "no such file"]),
    ("train --data {d}/binary.csv --text-column a --out {d}/run", ["not a UTF-8 text CSV"]),
    # tune
    ("tune --data {d}/nan.csv --dir {d}/search --max-trials 1", ["column 'b' has a NaN at line 8"]),
    ("tune --data {d}/binary.csv --dir {d}/search", ["{d}/binary.csv", "not a UTF-8"]),
    # export
    (
        "export {d}/model.keras --out {d}/export --verify {d}/nan.npz",
        ["--verify {d}/nan.npz", "array 'x' has a NaN in sample 5"],
    ),
    (
        "export {d}/model.keras --out {d}/export --quantize int8 --representative {d}/nan.npy",
        ["--representative {d}/nan.npy", "has a NaN in sample 5"],
    ),
    ("export {d}/model.keras --out {d}/export --data {d}/nan.npz", ["array 'x' has a NaN"]),
    ("export {d}/model.keras --out {d}/export --data {d}/binary.csv", ["not a UTF-8 text CSV"]),
    # predict
    ("predict {d}/model.keras {d}/nan.csv", ["INPUT {d}/nan.csv", "has a NaN at line 8"]),
    ("predict {d}/model.keras {d}/binary.csv", ["INPUT {d}/binary.csv", "not a UTF-8 text CSV"]),
    ("predict {d}/model.keras {d}/nan.npz", ["INPUT {d}/nan.npz", "array 'x' has a NaN"]),
    ("predict {d}/model.keras {d}/strings.npz", ["INPUT {d}/strings.npz", "numeric array 'x'"]),
    ("predict {d}/model.keras {d}/broken.npz", ["INPUT {d}/broken.npz", "cannot read"]),
    ("predict {d}/broken.onnx {d}/good.npz", ["MODEL {d}/broken.onnx", "not an ONNX model"]),
    ("predict {d}/model.h5 {d}/good.npz", ["MODEL {d}/model.h5", ".keras, .tflite or .onnx"]),
    ("predict {d}/model.keras {d}/good.csv --out {d}/p.csv --top 0", ["--top", "got 0"]),
    # benchmark
    ("benchmark {d}/model.keras --data {d}/nan.csv", ["column 'b' has a NaN at line 8"]),
    ("benchmark {d}/model.keras --data {d}/binary.csv", ["{d}/binary.csv", "not a UTF-8"]),
]  # fmt: skip


def _snapshot(root):
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    _files(root)
    return root


@pytest.mark.parametrize("command, fragments", CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_no_file(user_files, capsys, command, fragments):
    before = _snapshot(user_files)
    argv = command.format(d=user_files).split()
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"hlkeras {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment.format(d=user_files) in err, err
    assert _snapshot(user_files) == before
