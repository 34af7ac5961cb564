"""The data a command was given: `--dataset NAME` (TFDS, or the embedded
digits) or `--data PATH` (a user's files), with the command's settings."""

from hlkeras.data.files import load_path
from hlkeras.data.tables import DatasetError
from hlkeras.data.tfds import load


def load_source(
    dataset=None, path=None, *, batch_size=64, data_dir=None, seed=0, augment=False, **file_options
):
    """`load(dataset)` or `load_path(path)`: the data a command was given,
    `--dataset NAME` (TFDS, or the embedded digits when neither is given) or
    `--data PATH`, never both. `file_options` go to `load_path`."""
    if dataset is not None and path is not None:
        raise DatasetError(
            f"--data {path} and --dataset {dataset} exclude each other: "
            "train on your files or on a TFDS dataset"
        )
    if path is not None:
        return load_path(path, batch_size=batch_size, seed=seed, augment=augment, **file_options)
    return load(
        dataset or "digits",
        batch_size=batch_size,
        data_dir=data_dir,
        seed=seed,
        augment=augment,
        **{key: file_options[key] for key in _TEXT_OPTIONS if key in file_options},
    )


# The `load_path` options that apply to a TFDS text dataset too.
_TEXT_OPTIONS = ("max_length", "vocab_size", "tokenizer")


def load_for(settings, *, batch_size=64, augment=False, tokenizer=None):
    """`load_source` with a command's `settings`: `dataset`, `data`,
    `data_dir`, `seed` and the `--data` reading options, named as their flags
    (`val_split` for `--val-split`, ...). Texts are tokenized by `tokenizer`
    when given (a resumed run's), else by one fitted on the training split."""
    return load_source(
        settings["dataset"],
        settings["data"],
        batch_size=batch_size,
        data_dir=settings["data_dir"],
        seed=settings["seed"],
        augment=augment,
        image_size=settings["image_size"],
        color_mode=settings["color_mode"],
        label=settings["label"],
        validation_split=settings["val_split"],
        test_split=settings["test_split"],
        text_column=settings["text_column"],
        max_length=settings["max_length"],
        vocab_size=settings["vocab_size"],
        tokenizer=tokenizer,
    )
