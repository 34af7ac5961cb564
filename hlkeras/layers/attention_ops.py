"""Mask and rotary-position ops for attention, in `keras.ops` alone (the
counterpart of KerasHub's `transformer_layer_utils` and `RotaryEmbedding`).

Masks are boolean, True where attention is allowed, and broadcast against
attention logits of shape `(batch, heads, query_length, key_length)`.
"""

from keras import ops


def rotary_embedding(x, max_wavelength=10000):
    """Rotates `x` of shape `(batch, length, heads, dim)` by its positions.

    Rotary position embedding (Su et al., 2021) in the "rotate half" layout
    used by GPT-NeoX, Llama and KerasHub: feature `i` is paired with feature
    `i + dim / 2`, and the pair at position `p` is rotated by the angle
    `p * max_wavelength ** (-2 i / dim)`. Positions are `0 .. length - 1`.

    Args:
        x: Tensor of shape `(batch, length, heads, dim)` with an even `dim`.
        max_wavelength: The longest wavelength of the rotation frequencies.

    Returns:
        A tensor of the same shape and dtype as `x`.
    """
    x = ops.convert_to_tensor(x)
    half_dim = x.shape[-1] // 2
    positions = ops.cast(ops.arange(ops.shape(x)[1]), "float32")
    exponents = ops.cast(ops.arange(half_dim), "float32") / half_dim
    inverse_frequencies = ops.power(float(max_wavelength), -exponents)
    angles = ops.expand_dims(positions, -1) * inverse_frequencies
    # (length, 1, dim): both halves of a pair share one angle; the head axis
    # broadcasts.
    angles = ops.expand_dims(ops.concatenate([angles, angles], axis=-1), 1)
    cos = ops.cast(ops.cos(angles), x.dtype)
    sin = ops.cast(ops.sin(angles), x.dtype)
    first_half, second_half = x[..., :half_dim], x[..., half_dim:]
    rotated_half = ops.concatenate([-second_half, first_half], axis=-1)
    return x * cos + rotated_half * sin


def attention_mask_to_4d(attention_mask, target_shape):
    """Expands a user mask to rank 4 and checks it broadcasts to the logits.

    Like Keras, a rank-3 `(batch, query, key)` mask gains the head axis and a
    rank-2 `(query, key)` mask gains the batch and head axes.

    Args:
        attention_mask: Boolean-like tensor of rank 2, 3 or 4.
        target_shape: The logits shape `(batch, heads, query_length,
            key_length)`; `None` entries are unknown and not checked.

    Returns:
        A boolean tensor of rank 4.
    """
    mask_shape = tuple(attention_mask.shape)
    if len(mask_shape) not in (2, 3, 4):
        raise _mask_shape_error(mask_shape, target_shape)
    if len(mask_shape) == 3:
        expanded_shape = (mask_shape[0], 1) + mask_shape[1:]
    else:
        expanded_shape = (1,) * (4 - len(mask_shape)) + mask_shape
    for mask_size, target_size in zip(expanded_shape, target_shape):
        if mask_size not in (None, 1) and target_size not in (None, mask_size):
            raise _mask_shape_error(mask_shape, target_shape)
    attention_mask = ops.cast(attention_mask, "bool")
    for _ in range(4 - len(mask_shape)):
        attention_mask = ops.expand_dims(attention_mask, -3)
    return attention_mask


def _mask_shape_error(mask_shape, target_shape):
    return ValueError(
        "Argument `attention_mask` must broadcast to the attention logits of "
        "shape (batch, heads, query_length, key_length) = "
        f"{tuple(target_shape)}; a rank-3 mask is (batch, query_length, "
        "key_length), a rank-2 mask (query_length, key_length). "
        f"Received: attention_mask.shape={mask_shape}"
    )


def dynamic_shape(x):
    """Static sizes where known, scalar tensors where not (e.g. TF's None)."""
    dynamic = ops.shape(x)
    return tuple(static if static is not None else dynamic[i] for i, static in enumerate(x.shape))


def masked_softmax(scores, mask=None, empty_rows="zeros"):
    """Softmax of `scores` over the last axis, over the positions `mask`
    (broadcastable to `scores`) keeps; the others get weight exactly 0,
    whatever finite values they hold.

    Written without a large negative fill value (`where(mask, s, -1e9)`): a
    tensor holding one would leave int8 TFLite quantization no resolution
    for the real scores (an int8 text Transformer scored 71% against Keras'
    100% that way).

    Args:
        scores: Float tensor.
        mask: Optional boolean mask, True where a position is kept.
        empty_rows: What a row with no kept position gets: `"zeros"`
            (AttentionPooling: an all-padding sequence pools to zeros) or
            `"uniform"` (attention: what `keras.layers.MultiHeadAttention`
            gives a fully masked query).
    """
    scores = ops.convert_to_tensor(scores)
    if mask is None:
        return ops.softmax(scores, axis=-1)
    # The mask broadcasts in each product, as `broadcast_to` would have
    # broadcast it: an explicit (batch, heads, query, key) copy of it was 42%
    # of the text Transformer's float32 LiteRT time (BROADCAST_TO, measured
    # by benchmarks/export.py --profile).
    kept = ops.cast(mask, scores.dtype)
    # The largest kept score: masked scores are replaced by the row's minimum.
    # (`1 - kept` as a cast of the negated mask: LiteRT's int8 SUB of it took
    # 8 us, a third of an int8 text Transformer block's mask work.)
    lowest = ops.min(scores, axis=-1, keepdims=True)
    dropped = ops.cast(ops.logical_not(mask), scores.dtype)
    highest = ops.max(scores * kept + lowest * dropped, axis=-1, keepdims=True)
    # Masked scores are zeroed *before* exp(): exp() of one above the kept
    # maximum would overflow to inf, and inf * 0 is NaN. Each term is zeroed
    # on its own, so no subtraction of two large values can overflow either.
    shifted = scores * kept - ops.stop_gradient(highest) * kept
    if empty_rows == "uniform":
        # An empty row keeps every position, each with exp(0) (its shifted
        # scores are all 0): uniform weights. Done on the mask's shape, not
        # by adding 1/length to the (batch, heads, query, key) weights: that
        # broadcast ADD was a third of the int8 text Transformer's LiteRT
        # time (30 us each, benchmarks/export.py --profile).
        kept = kept + (1.0 - ops.max(kept, axis=-1, keepdims=True))
    exponentials = ops.exp(shifted) * kept
    # 1 for a row that keeps a position, whose total is then >= 1 (its
    # largest term is exp(0)); an empty row divides zeros by 1. No epsilon:
    # int8 TFLite's DIV refuses a divisor that quantizes to zero.
    kept_any = ops.max(kept, axis=-1, keepdims=True)
    total = ops.sum(exponentials, axis=-1, keepdims=True) + 1.0 - kept_any
    # One reciprocal per row, then a product: LiteRT's int8 DIV of the
    # (batch, ..., length) terms returned its maximum for terms of one
    # quantum (a weight of 0.98 for exp() = 0.004 over a total of 5.1).
    return exponentials * (1.0 / total)
