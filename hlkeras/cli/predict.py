"""`hlkeras predict MODEL INPUT...`: class names and probabilities of image
files, folders, CSV rows, `.npz` arrays or texts (`hlkeras.predict`)."""

from hlkeras.cli.common import COMMON_FLAGS
from hlkeras.cli.common import UsageError


def add_parser(commands):
    predict = commands.add_parser(
        "predict",
        parents=[COMMON_FLAGS],
        help="run a trained model on image files, an image folder, a CSV or a .npz",
        description=(
            "Prints one line per input: input, class name, probability. MODEL is a "
            "run directory, a .keras, a .tflite file (run in the LiteRT "
            "interpreter, one input at a time) or a .onnx file (ONNX Runtime, one "
            "input at a time)."
        ),
    )
    predict.add_argument("model", metavar="MODEL")
    predict.add_argument("inputs", metavar="INPUT", nargs="+")
    predict.add_argument("--top", type=int, default=1, help="the K most probable classes")
    predict.add_argument("--out", help="also write the predictions to this CSV file")
    predict.add_argument(
        "--label",
        help="a CSV input's label column, skipped (default: the run's, else 'label')",
    )
    predict.add_argument(
        "--text-column",
        help="a text model's CSV input: the texts' column (default: the run's, else 'text')",
    )
    predict.set_defaults(func=run)


def run(args):
    from hlkeras import predict

    if args.top < 1:
        raise UsageError(f"--top must be a positive integer, got {args.top}")
    try:
        model = predict.load_predictor(args.model)
        # A run directory recorded the columns it was trained on; flags win.
        if model.tokenizer is not None:
            text_column = args.text_column or model.text_column or "text"
            names, inputs = predict.read_texts(args.inputs, model.tokenizer, text_column)
        else:
            label = args.label or model.label or "label"
            names, inputs = predict.read_inputs(args.inputs, model.input_shape, label=label)
    except predict.PredictError as error:
        raise UsageError(str(error)) from None
    tops = predict.top_classes(model.predict(inputs), model.class_names, k=args.top)
    for name, top in zip(names, tops):
        print(", ".join([name] + [f"{label}, {p:.4f}" for label, p in top]))
    if args.out:
        predict.write_csv(args.out, names, tops)
        print(f"wrote {args.out}")
    return 0
