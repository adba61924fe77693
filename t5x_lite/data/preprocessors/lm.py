"""Causal (GPT) and prefix language-model objectives as SeqIO preprocessors.

Documents are tokenized, each is followed by EOS (the document separator, as GPT-2's
<|endoftext|>), and the stream is cut into fixed-length chunks:

  causal LM:  targets = a chunk of `sequence_length["targets"]` tokens
  prefix LM:  a chunk of max(inputs, targets length) tokens split at a random point:
              inputs = chunk[:split], targets = chunk[split:]   (inputs + targets == chunk)

No EOS is appended to the chunks (features have add_eos=False): a chunk is a window on running
text. Feature converter: `seqio.DecoderFeatureConverter` for both (it runs the prefix-LM
conversion, with `decoder_causal_attention` and loss on the targets only, when the task
feature lengths have `inputs`), or `seqio.LMFeatureConverter` / `seqio.PrefixLMFeatureConverter`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import gin
import seqio
import tensorflow as tf

from t5x_lite.data.preprocessors import text


def _feature_length(sequence_length: Mapping[str, int] | None, key: str, objective: str) -> int:
    if not sequence_length or not sequence_length.get(key):
        raise ValueError(
            f"The {objective} objective needs sequence_length[{key!r}] (got {sequence_length!r}); set it in "
            "TASK_FEATURE_LENGTHS."
        )
    return sequence_length[key]


def _chunks(
    dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature], chunk_length: int
) -> tf.data.Dataset:
    """The documents, each followed by EOS, as one stream cut into `chunk_length`-token chunks."""
    eos_id = output_features["targets"].vocabulary.eos_id
    if eos_id is None:
        raise ValueError("The LM objectives separate documents with EOS, but the targets vocabulary has no eos_id.")
    eos = tf.constant([eos_id], dataset.element_spec["targets"].dtype)
    documents = dataset.map(lambda ex: {"targets": tf.concat([ex["targets"], eos], axis=0)})
    return text.split_token_stream(documents, chunk_length)


@gin.configurable
def pack_lm_chunks(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None,
    output_features: Mapping[str, seqio.Feature],
) -> tf.data.Dataset:
    """Concatenates the documents (each + EOS) and cuts chunks of `sequence_length["targets"]` tokens.

    Every chunk but the stream's last fills the targets length. Output: `{"targets": chunk}`.
    """
    return _chunks(dataset, output_features, _feature_length(sequence_length, "targets", "causal LM"))


def prefix_lm_chunk_length(sequence_length: Mapping[str, int]) -> int:
    """Chunk length of the prefix LM: max(inputs, targets); the split keeps each part within its length."""
    return max(
        _feature_length(sequence_length, "inputs", "prefix LM"), _feature_length(sequence_length, "targets", "prefix LM")
    )


@gin.configurable
def pack_prefix_lm_chunks(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None,
    output_features: Mapping[str, seqio.Feature],
) -> tf.data.Dataset:
    """Like `pack_lm_chunks` with `prefix_lm_chunk_length` tokens per chunk; drops a last chunk under 2 tokens."""
    chunks = _chunks(dataset, output_features, prefix_lm_chunk_length(sequence_length))
    return chunks.filter(lambda ex: tf.size(ex["targets"]) >= 2)


@gin.configurable
@seqio.map_over_dataset(num_seeds=1)
def split_prefix_lm(
    features: Mapping[str, tf.Tensor], sequence_length: Mapping[str, int] | None, seed: tf.Tensor
) -> dict[str, tf.Tensor]:
    """Splits `targets` (n >= 2 tokens) at a uniformly random point into `inputs` (prefix) and `targets` (suffix).

    The split s is uniform over the points that leave both parts non-empty and within their
    lengths: max(1, n - targets_length) <= s <= min(inputs_length, n - 1).
    """
    tokens = features["targets"]
    split = random_split_point(
        tf.size(tokens), _feature_length(sequence_length, "inputs", "prefix LM"),
        _feature_length(sequence_length, "targets", "prefix LM"), seed,
    )
    return {"inputs": tokens[:split], "targets": tokens[split:]}


def random_split_point(length: tf.Tensor, max_prefix: int, max_suffix: int, seed: tf.Tensor) -> tf.Tensor:
    """A split point s of `length` (>= 2) tokens, uniform over max(1, length - max_suffix) <= s <= min(max_prefix,
    length - 1): both parts non-empty, the prefix at most `max_prefix` and the suffix at most `max_suffix` tokens."""
    low = tf.maximum(1, length - max_suffix)
    high = tf.minimum(max_prefix, length - 1)
    with tf.control_dependencies(
        [tf.debugging.assert_less_equal(low, high, message="prefix LM: no split point fits the feature lengths")]
    ):
        return tf.random.stateless_uniform([], seed, minval=low, maxval=high + 1, dtype=tf.int32)


def lm_preprocessors() -> list[Callable[..., tf.data.Dataset]]:
    """Causal LM over a `text` field: rekey, tokenize, cache placeholder, pack."""
    return [*text.tokenize_text(), pack_lm_chunks]


def prefix_lm_preprocessors() -> list[Callable[..., tf.data.Dataset]]:
    """Prefix LM over a `text` field: rekey, tokenize, cache placeholder, pack, random split."""
    return [*text.tokenize_text(), pack_prefix_lm_chunks, split_prefix_lm]
