"""Model builders: plain functional `keras.Model`s made from hlkeras layers.

Each builder takes `(input_shape, num_classes)` and keyword-only
hyperparameters. `build(spec)` makes the same models from one JSON-friendly
dict, the form a tuner samples and a run directory records (`spec.json`).
Models end in a float32 softmax, so they train with sparse categorical
crossentropy and stay float32 at the output under mixed precision.
"""

import inspect

import keras

from hlkeras import _validation
from hlkeras.layers import AttentionPooling
from hlkeras.layers import ConvResidualBlock
from hlkeras.layers import PositionEmbedding
from hlkeras.layers import ResidualBlock
from hlkeras.layers import TransformerBlock

SPEC_FIXED_KEYS = ("arch", "input_shape", "num_classes")


def _check_input_shape(input_shape):
    shape = tuple(input_shape) if isinstance(input_shape, (list, tuple)) else None
    if not shape or not all(_validation.is_int(d) and d > 0 for d in shape):
        raise ValueError(
            "Argument `input_shape` must be a non-empty tuple of positive "
            f"integers, without the batch axis. Received: input_shape={input_shape!r}"
        )
    return shape


def _check_image_shape(input_shape, arch):
    shape = _check_input_shape(input_shape)
    if len(shape) != 3:
        raise ValueError(
            "Argument `input_shape` must be (height, width, channels) for "
            f"`{arch}`. Received: input_shape={input_shape!r}"
        )
    return shape


def _classifier_head(x, num_classes, dropout):
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    logits = keras.layers.Dense(num_classes, name="head")(x)
    # float32 probabilities even under a mixed precision policy.
    return keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)


def mlp(
    input_shape,
    num_classes,
    *,
    depth=2,
    width=256,
    dropout=0.1,
    hidden_ratio=2,
    activation="gelu",
    drop_path=0.0,
    feature_mean=None,
    feature_variance=None,
):
    """A residual MLP classifier: flatten, a linear stem to `width`, `depth`
    pre-norm `ResidualBlock`s, a final LayerNorm and a softmax head.

    Args:
        input_shape: Tuple of positive ints without the batch axis, e.g.
            `(8, 8, 1)`.
        num_classes: Positive int, the number of classes.
        depth: Positive int, the number of residual blocks.
        width: Positive int, the feature size of the residual stream.
        dropout: Float in [0, 1), dropout inside each block and before the
            head.
        hidden_ratio: Positive int, the blocks' inner width is
            `hidden_ratio * width`.
        activation: Name of a Keras activation for the blocks.
        drop_path: Float in [0, 1), stochastic depth of each block.
        feature_mean, feature_variance: Per-feature statistics of the
            training inputs (lists, e.g. `hlkeras.data.load_path`'s for a
            CSV); the model then starts with a `Normalization` layer, so an
            exported model takes raw features.

    Returns:
        A functional `keras.Model` from images to class probabilities.

    Example:

    >>> model = mlp((8, 8, 1), 10, depth=1, width=32)
    >>> model.output_shape
    (None, 10)
    """
    input_shape = _check_input_shape(input_shape)
    _validation.check_positive_int("num_classes", num_classes)
    _validation.check_positive_int("depth", depth)
    _validation.check_positive_int("width", width)
    _validation.check_positive_int("hidden_ratio", hidden_ratio)
    dropout = _validation.check_rate("dropout", dropout)
    inputs = keras.Input(shape=input_shape, name="images")
    x = keras.layers.Flatten(name="flatten")(inputs)
    if feature_mean is not None:
        x = keras.layers.Normalization(
            mean=list(feature_mean), variance=list(feature_variance), name="normalize"
        )(x)
    x = keras.layers.Dense(width, name="stem")(x)
    for i in range(depth):
        x = ResidualBlock(
            width,
            hidden_units=hidden_ratio * width,
            activation=activation,
            dropout=dropout,
            drop_path=drop_path,
            name=f"block_{i}",
        )(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="head_norm")(x)
    outputs = _classifier_head(x, num_classes, dropout)
    return keras.Model(inputs, outputs, name="mlp")


def resnet(
    input_shape,
    num_classes,
    *,
    depth=2,
    width=32,
    dropout=0.0,
    stages=2,
    bottleneck=False,
    activation="relu",
    drop_path=0.0,
):
    """A ResNet classifier for NHWC images, from `ConvResidualBlock`s.

    A 3x3 convolution stem with BatchNorm, then `stages` stages of `depth`
    blocks each; stage `s` has `width * 2**s` channels and its first block
    (after the first stage) halves the spatial size. Global average pooling
    and a softmax head follow.

    Args:
        input_shape: `(height, width, channels)`.
        num_classes: Positive int, the number of classes.
        depth: Positive int, residual blocks per stage.
        width: Positive int, channels of the stem and the first stage.
        dropout: Float in [0, 1), dropout before the head.
        stages: Positive int, the number of stages.
        bottleneck: Whether the blocks are 1x1-3x3-1x1 bottlenecks (then
            `width` must be divisible by 4).
        activation: Name of a Keras activation.
        drop_path: Float in [0, 1), stochastic depth of each block.

    Returns:
        A functional `keras.Model` from images to class probabilities.

    Example:

    >>> model = resnet((8, 8, 1), 10, depth=1, width=8)
    >>> model.output_shape
    (None, 10)
    """
    input_shape = _check_image_shape(input_shape, "resnet")
    _validation.check_positive_int("num_classes", num_classes)
    _validation.check_positive_int("depth", depth)
    _validation.check_positive_int("width", width)
    _validation.check_positive_int("stages", stages)
    dropout = _validation.check_rate("dropout", dropout)
    inputs = keras.Input(shape=input_shape, name="images")
    x = keras.layers.Conv2D(
        width,
        3,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name="stem_conv",
    )(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.Activation(activation, name="stem_activation")(x)
    for stage in range(stages):
        for block in range(depth):
            x = ConvResidualBlock(
                width * 2**stage,
                strides=2 if stage > 0 and block == 0 else 1,
                bottleneck=bottleneck,
                activation=activation,
                drop_path=drop_path,
                name=f"stage_{stage}_block_{block}",
            )(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = _classifier_head(x, num_classes, dropout)
    return keras.Model(inputs, outputs, name="resnet")


def vit(
    input_shape,
    num_classes,
    *,
    depth=2,
    width=64,
    num_heads=4,
    patch_size=2,
    dropout=0.1,
    num_experts=0,
    top_k=2,
    capacity_factor=1.25,
    ffn_ratio=2,
    drop_path=0.0,
    activation="gelu",
):
    """A Vision Transformer classifier from `TransformerBlock`s.

    Non-overlapping `patch_size` patches are embedded by a strided
    convolution, a learned `PositionEmbedding` is added, `depth` pre-norm
    `TransformerBlock`s follow, then a final LayerNorm, mean pooling over the
    patch tokens and a softmax head. With `num_experts > 0` each block's FFN is
    a sparse `MixtureOfExperts` of `num_experts` experts, `top_k` per token.

    Args:
        input_shape: `(height, width, channels)`, both sides divisible by
            `patch_size`.
        num_classes: Positive int, the number of classes.
        depth: Positive int, the number of Transformer blocks.
        width: Positive int, the token width; `num_heads` must divide it.
        num_heads: Positive int, attention heads per block.
        patch_size: Positive int, the side of a square patch.
        dropout: Float in [0, 1), dropout in the blocks and before the head.
        num_experts: Int >= 0, experts per MoE FFN (0: dense FFNs).
        top_k: Positive int <= `num_experts`, experts per token.
        capacity_factor: MoE expert capacity factor (`None`: dropless).
        ffn_ratio: Positive int, the FFN hidden width is `ffn_ratio * width`.
        drop_path: Float in [0, 1), stochastic depth of each block.
        activation: Name of a Keras activation for the FFNs.

    Returns:
        A functional `keras.Model` from images to class probabilities.

    Example:

    >>> model = vit((8, 8, 1), 10, depth=1, width=16, num_heads=2, num_experts=4)
    >>> model.output_shape
    (None, 10)
    """
    input_shape = _check_image_shape(input_shape, "vit")
    _validation.check_positive_int("num_classes", num_classes)
    _validation.check_positive_int("depth", depth)
    _validation.check_positive_int("width", width)
    _validation.check_positive_int("num_heads", num_heads)
    _validation.check_positive_int("patch_size", patch_size)
    _validation.check_positive_int("ffn_ratio", ffn_ratio)
    dropout = _validation.check_rate("dropout", dropout)
    if width % num_heads:
        raise ValueError(
            "Argument `num_heads` must divide `width` (each head gets "
            f"width // num_heads features). Received: num_heads={num_heads}, "
            f"width={width}"
        )
    height, image_width, _ = input_shape
    if height % patch_size or image_width % patch_size:
        raise ValueError(
            "Argument `patch_size` must divide the image height and width. "
            f"Received: patch_size={patch_size}, input_shape={input_shape!r}"
        )
    num_patches = (height // patch_size) * (image_width // patch_size)
    inputs = keras.Input(shape=input_shape, name="images")
    x = keras.layers.Conv2D(width, patch_size, strides=patch_size, name="patch_embedding")(inputs)
    x = keras.layers.Reshape((num_patches, width), name="patch_tokens")(x)
    x = PositionEmbedding(num_patches, name="position_embedding")(x)
    for block in range(depth):
        x = TransformerBlock(
            num_heads,
            ffn_ratio * width,
            dropout=dropout,
            drop_path=drop_path,
            activation=activation,
            num_experts=num_experts,
            top_k=top_k,
            capacity_factor=capacity_factor,
            name=f"block_{block}",
        )(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="head_norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = _classifier_head(x, num_classes, dropout)
    return keras.Model(inputs, outputs, name="vit")


TEXT_ENCODERS = ("transformer", "gru", "lstm")
TEXT_POOLINGS = ("attention", "mean")


def text(
    input_shape,
    num_classes,
    *,
    vocabulary_size=20_000,
    encoder="transformer",
    depth=2,
    width=64,
    num_heads=4,
    dropout=0.1,
    pooling="attention",
    bidirectional=True,
    num_experts=0,
    top_k=2,
    capacity_factor=None,
    ffn_ratio=2,
):
    """A sequence classifier over token ids (0 is padding).

    `Embedding(mask_zero=True)`, then an encoder: `depth` pre-norm
    `TransformerBlock`s with rotary position embeddings (RoPE) and a final
    LayerNorm, or `depth` Keras `GRU` / `LSTM` layers (bidirectional: each
    direction has `width // 2` units). Then `AttentionPooling` (or masked mean
    pooling) and a softmax head. The padding mask reaches every layer, so
    extra padding never changes a prediction.

    Args:
        input_shape: `(max_length,)`, the padded length of a token sequence.
        num_classes: Positive int, the number of classes.
        vocabulary_size: Positive int, token ids are in `[0, vocabulary_size)`.
        encoder: `"transformer"`, `"gru"` or `"lstm"`.
        depth: Positive int, encoder layers.
        width: Positive int, the embedding and encoder width.
        num_heads: Positive int dividing `width` (transformer only).
        dropout: Float in [0, 1), dropout in the encoder and before the head.
        pooling: `"attention"` (`AttentionPooling`) or `"mean"`.
        bidirectional: Whether a recurrent encoder reads both directions.
        num_experts: Int >= 0, MoE experts per transformer FFN (0: dense).
        top_k: Positive int <= `num_experts`, experts per token.
        capacity_factor: MoE expert capacity factor. The default `None`
            (dropless) keeps padding from changing predictions: with a
            capacity, padded tokens take expert slots too.
        ffn_ratio: Positive int, the FFN hidden width is `ffn_ratio * width`.

    Returns:
        A functional `keras.Model` from int32 token ids to class probabilities.

    Example:

    >>> model = text((16,), 3, vocabulary_size=100, depth=1, width=16)
    >>> model.output_shape
    (None, 3)
    """
    input_shape = _check_input_shape(input_shape)
    if len(input_shape) != 1:
        raise ValueError(
            "Argument `input_shape` must be (max_length,) for `text` (token ids). "
            f"Received: input_shape={input_shape!r}"
        )
    for name, value in (
        ("num_classes", num_classes),
        ("vocabulary_size", vocabulary_size),
        ("depth", depth),
        ("width", width),
    ):
        _validation.check_positive_int(name, value)
    _validation.check_choice("encoder", encoder, TEXT_ENCODERS)
    _validation.check_choice("pooling", pooling, TEXT_POOLINGS)
    dropout = _validation.check_rate("dropout", dropout)
    tokens = keras.Input(shape=input_shape, dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocabulary_size, width, mask_zero=True, name="token_embedding")(
        tokens
    )
    if encoder == "transformer":
        block_options = dict(
            dropout=dropout, num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor
        )
        x = _transformer_encoder(x, depth, num_heads, ffn_ratio * width, block_options)
    else:
        x = _recurrent_encoder(x, encoder, depth, width, dropout, bidirectional)
    if pooling == "attention":
        x = AttentionPooling(name="pool")(x)
    else:
        x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = _classifier_head(x, num_classes, dropout)
    return keras.Model(tokens, outputs, name="text")


def _transformer_encoder(x, depth, num_heads, ffn_units, block_options):
    # RoPE instead of a position embedding: any length, and padding at the
    # end moves no real token.
    for block in range(depth):
        x = TransformerBlock(
            num_heads, ffn_units, rope=True, name=f"block_{block}", **block_options
        )(x)
    return keras.layers.LayerNormalization(epsilon=1e-5, name="head_norm")(x)


def _recurrent_encoder(x, encoder, depth, width, dropout, bidirectional):
    if bidirectional and width % 2:
        raise ValueError(
            "Argument `width` must be even for a bidirectional recurrent "
            f"encoder (width // 2 units per direction). Received: width={width}"
        )
    recurrent = {"gru": keras.layers.GRU, "lstm": keras.layers.LSTM}[encoder]
    for block in range(depth):
        if bidirectional:
            layer = keras.layers.Bidirectional(
                recurrent(width // 2, return_sequences=True, dropout=dropout),
                name=f"block_{block}",
            )
        else:
            layer = recurrent(width, return_sequences=True, dropout=dropout, name=f"block_{block}")
        x = layer(x)
    return x


# The architectures `build` knows, by spec["arch"].
ARCHITECTURES = {"mlp": mlp, "resnet": resnet, "vit": vit, "text": text}


# The kinds of data (`hlkeras.data.DatasetInfo.kind`) each arch takes; the
# mlp flattens images too.
ARCH_DATA_KINDS = {
    "mlp": ("table", "images"),
    "resnet": ("images",),
    "vit": ("images",),
    "text": ("text",),
}
_KIND_NAMES = {"images": "images", "table": "a table", "text": "texts"}


def check_arch_for_data(arch, kind, error=ValueError):
    """Raises `error` when `arch` cannot take data of `kind`, naming the
    archs that can."""
    if kind not in ARCH_DATA_KINDS[arch]:
        fitting = [name for name, kinds in ARCH_DATA_KINDS.items() if kind in kinds]
        takes = " or ".join(_KIND_NAMES[k] for k in ARCH_DATA_KINDS[arch])
        raise error(
            f"--arch {arch} takes {takes}, but the data is {_KIND_NAMES[kind]} "
            f"(use --arch {' or '.join(fitting)})"
        )


def _builder_for(arch):
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"spec['arch'] must be one of {sorted(ARCHITECTURES)}. Received: arch={arch!r}"
        )
    return ARCHITECTURES[arch]


def hyperparameter_defaults(arch):
    """The keyword-only hyperparameters of `arch` and their default values."""
    signature = inspect.signature(_builder_for(arch))
    return {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


def resolve_spec(spec):
    """Checks a model spec and returns a copy with every default filled in.

    The result is JSON-friendly and `build(resolve_spec(spec))` is the same
    model as `build(spec)`, so a run directory can record it in full.

    Raises:
        ValueError: naming the key for a missing or unknown key or an unknown
            `arch`.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"A model spec must be a dict. Received: {spec!r}")
    missing = [key for key in SPEC_FIXED_KEYS if key not in spec]
    if missing:
        raise ValueError(
            f"The model spec is missing key(s) {missing}; it needs "
            f"{list(SPEC_FIXED_KEYS)} plus hyperparameters. Received: {spec!r}"
        )
    defaults = hyperparameter_defaults(spec["arch"])
    for key in spec:
        if key not in SPEC_FIXED_KEYS and key not in defaults:
            raise ValueError(
                f"Unknown key {key!r} in the spec for arch={spec['arch']!r}. "
                f"Allowed keys: {list(SPEC_FIXED_KEYS) + sorted(defaults)}"
            )
    resolved = {
        "arch": spec["arch"],
        "input_shape": list(_check_input_shape(spec["input_shape"])),
        "num_classes": spec["num_classes"],
    }
    resolved.update(defaults)
    resolved.update({k: v for k, v in spec.items() if k not in SPEC_FIXED_KEYS})
    return resolved


def build(spec):
    """Builds a model from a plain dict.

    Args:
        spec: `{"arch": "mlp" | "resnet" | "vit", "input_shape": [...],
            "num_classes": N, ...}` plus any keyword-only hyperparameters of
            that builder (`depth`, `width`, `dropout`, ...). Missing
            hyperparameters take the builder's defaults.

    Returns:
        A functional `keras.Model`.

    Example:

    >>> model = build({"arch": "mlp", "input_shape": [8, 8, 1],
    ...                "num_classes": 10, "depth": 1, "width": 32})
    >>> model.name
    'mlp'
    """
    resolved = resolve_spec(spec)
    hyperparameters = {k: v for k, v in resolved.items() if k not in SPEC_FIXED_KEYS}
    return ARCHITECTURES[resolved["arch"]](
        tuple(resolved["input_shape"]), resolved["num_classes"], **hyperparameters
    )
