"""`PositionEmbedding`: a learned position embedding added to a sequence."""

import keras
from keras import ops

from hlkeras import _validation
from hlkeras.layers.weight_options import WeightOptions


@keras.saving.register_keras_serializable(package="hlkeras")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned position embedding to a sequence `(batch, length, d)`.

    Position `i` adds row `i` of a `(max_length, d)` table, so sequences up to
    `max_length` tokens work, including variable lengths. Used by
    `hlkeras.models.vit` for its patch tokens.

    Args:
        max_length: Positive int, the longest sequence the table covers.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`,
            and the Keras weight arguments of the table, as in
            `keras.layers.Embedding`: `embeddings_initializer` (default
            normal with stddev 0.02), `embeddings_regularizer`,
            `embeddings_constraint`, and `activity_regularizer`.

    Call arguments:
        inputs: Tensor `(batch, length, d)` with `length <= max_length`.

    Example:

    >>> tuple(PositionEmbedding(16)(keras.ops.zeros((2, 5, 8))).shape)
    (2, 5, 8)
    """

    def __init__(self, max_length, **kwargs):
        weight_options = WeightOptions.pop(kwargs, kinds=("embeddings",))
        super().__init__(**kwargs)
        self.weight_options = weight_options
        self.max_length = _validation.check_positive_int("max_length", max_length)
        self.supports_masking = True

    def build(self, input_shape):
        _validation.check_sequence_shape("inputs", input_shape)
        if input_shape[1] is not None and input_shape[1] > self.max_length:
            raise ValueError(
                f"PositionEmbedding(max_length={self.max_length}) got sequences "
                f"of length {input_shape[1]}. Received input_shape="
                f"{tuple(input_shape)}"
            )
        self.embeddings = self.add_weight(
            shape=(self.max_length, input_shape[-1]),
            name="embeddings",
            **self.weight_options.weight(
                "embeddings", keras.initializers.RandomNormal(stddev=0.02)
            ),
        )

    def call(self, inputs):
        length = ops.shape(inputs)[1]
        positions = ops.cast(self.embeddings[:length], inputs.dtype)
        return inputs + positions[None]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"max_length": self.max_length, **self.weight_options.get_config()})
        return config
