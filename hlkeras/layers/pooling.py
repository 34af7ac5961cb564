"""`AttentionPooling`: a sequence `(batch, length, d)` pooled to `(batch, d)`
by learned attention weights that honour the Keras padding mask."""

import keras

from hlkeras import _validation
from hlkeras.layers.attention_ops import masked_softmax
from hlkeras.layers.weight_options import WeightOptions


@keras.saving.register_keras_serializable(package="hlkeras")
class AttentionPooling(keras.layers.Layer):
    """Learned attention-weighted pooling of a sequence.

    Each position `t` gets a score, the scores are softmax-normalized over
    the positions the Keras mask keeps, and the output is the weighted sum
    `sum_t a_t x_t`. Without `units` the score is `x_t . w` (a learned query
    vector); with `units` it is additive (Bahdanau) attention,
    `tanh(x_t W + b) . w`. Padded positions get weight exactly 0, so padding
    never changes the output, and an all-padding sequence pools to zeros.

    Args:
        units: Optional positive int, the hidden width of additive scoring.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`,
            and the Keras weight arguments `kernel_initializer`,
            `kernel_regularizer`, `kernel_constraint` (the scoring weights),
            `bias_initializer`, `bias_regularizer`, `bias_constraint` (the
            additive-scoring bias) and `activity_regularizer`.

    Call arguments:
        inputs: Tensor `(batch, length, d)`.
        mask: Optional boolean `(batch, length)`, True where a position is
            real; passed automatically after `Embedding(mask_zero=True)`.
        return_attention_scores: Whether to also return the weights
            `(batch, length)`.

    Example:

    >>> tokens = keras.Input(shape=(None,), dtype="int32")
    >>> x = keras.layers.Embedding(100, 16, mask_zero=True)(tokens)
    >>> keras.Model(tokens, AttentionPooling()(x)).output_shape
    (None, 16)
    """

    def __init__(
        self,
        units=None,
        **kwargs,
    ):
        weight_options = WeightOptions.pop(kwargs)
        super().__init__(**kwargs)
        self.weight_options = weight_options
        self.units = None if units is None else _validation.check_positive_int("units", units)
        self.supports_masking = True

    def build(self, input_shape):
        _validation.check_sequence_shape("inputs", input_shape)
        width = input_shape[-1]
        if self.units is not None:
            self.hidden_kernel = self._scoring_weight("hidden_kernel", (width, self.units))
            self.hidden_bias = self.add_weight(
                name="hidden_bias",
                shape=(self.units,),
                **self.weight_options.weight("bias", "zeros"),
            )
            width = self.units
        self.query = self._scoring_weight("query", (width,))

    def _scoring_weight(self, name, shape):
        return self.add_weight(
            name=name,
            shape=shape,
            **self.weight_options.weight("kernel", "glorot_uniform"),
        )

    def call(self, inputs, mask=None, return_attention_scores=False):
        hidden = inputs
        if self.units is not None:
            hidden = keras.ops.tanh(keras.ops.matmul(inputs, self.hidden_kernel) + self.hidden_bias)
        # The softmax runs in float32 under mixed precision.
        scores = keras.ops.cast(keras.ops.matmul(hidden, self.query), "float32")
        weights = masked_softmax(scores, mask)
        weights = keras.ops.cast(weights, inputs.dtype)
        pooled = keras.ops.sum(inputs * weights[..., None], axis=1)
        return (pooled, weights) if return_attention_scores else pooled

    def compute_mask(self, inputs, mask=None):
        return None  # the length axis is gone

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                **self.weight_options.get_config(),
            }
        )
        return config
