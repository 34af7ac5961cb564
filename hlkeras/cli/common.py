"""What every command shares: the one-line `UsageError`, the parser that
reports its own errors in one line, the common flags, the flags of a
user's own data and those of the data a model is measured on."""

import argparse
import sys

from hlkeras._validation import check_flag_choice


def _common_flags():
    """Flags every command takes. `--verbose` is read by the console script
    (`hlkeras_launcher`) before this parser exists; here it is only accepted."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose", action="store_true", help="also show TensorFlow's native log lines"
    )
    return common


COMMON_FLAGS = _common_flags()


class UsageError(Exception):
    """A user mistake the CLI reports as one line, without a traceback."""


class OneLineErrorParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors (a flag's value that does not parse,
    an unknown flag) are one line, as hlkeras' own checks are, not the usage
    text followed by the error. `--help` still shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def report_run(command, outcome, table, roles):
    """Prints a finished run's `table` lines and where its files are, or the
    one-line error of a NaN stop or a refused `.tflite`; the exit status."""
    if outcome.nan_message:
        print(f"hlkeras {command}: error: {outcome.nan_message}", file=sys.stderr)
        return 1
    print("\n".join(table(outcome.metrics)))
    print("\n".join(outcome.run_dir.summary(roles)))
    if outcome.refused:
        message = f"model.tflite was not written: {outcome.refused}"
        print(f"hlkeras {command}: error: {message}", file=sys.stderr)
        return 1
    return 0


def add_data_flags(flag):
    """The flags of a user's own data (`hlkeras.data.load_path`)."""
    flag(
        "--data",
        metavar="PATH",
        help="your own data: a folder of class subfolders of images, a .csv or a .npz file",
    )
    flag("--image-size", type=int, nargs=2, metavar=("H", "W"), help="resize images to H x W")
    flag("--color-mode", help="grayscale or rgb (default: the first image's)")
    flag("--label", help="the CSV's label column (default 'label')")
    flag("--val-split", type=float, help="validation fraction drawn from --data (default 0.1)")
    flag("--test-split", type=float, help="test fraction drawn from --data (default 0.2)")
    flag("--text-column", metavar="COL", help="--data is a CSV of texts: the column to classify")
    flag("--max-length", type=int, help="texts: tokens per text (default: covers 95%% of them)")
    flag("--vocab-size", type=int, help="texts: token ids incl. padding, unknown (default 20000)")


def add_measuring_data_flags(parser, dataset_help):
    """The flags naming the data a trained model is measured on (`export`,
    `benchmark`): a dataset, or the user's own `--data` as it was trained."""
    parser.add_argument("--dataset", metavar="NAME", help=dataset_help)
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="the model's own data, as hlkeras train --data: int8 calibrates on 200 of "
        "its training examples; its test split measures parity and accuracy",
    )
    parser.add_argument("--label", default="label", help="--data CSV's label column")
    parser.add_argument(
        "--text-column",
        metavar="COL",
        help="--data is a CSV of texts (a text model): tokenized with the "
        "vocabulary.json beside the model",
    )


def given_settings(args, defaults):
    """The settings among `defaults`' keys that a flag gave."""
    return {key: getattr(args, key) for key in defaults if getattr(args, key, None) is not None}


def comma_list(flag, text, allowed):
    values = [v.strip() for v in text.split(",") if v.strip()]
    for value in values or [""]:
        check_flag_choice(flag, value, allowed, UsageError)
    return values


def check_onnx_installed(flag):
    from hlkeras import export

    try:
        export.check_onnx_installed()
    except export.ExportError as error:
        raise UsageError(f"{flag} onnx: {error}") from None
