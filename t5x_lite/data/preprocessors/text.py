"""Steps shared by the text pipelines: lines to examples, TSV fields, token-stream chunks, EOS fitting."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import gin
import seqio
import tensorflow as tf

LONG_SEQUENCE_ERROR = "is longer than TASK_FEATURE_LENGTHS allows"


def lines_to_text_examples(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`TextLineDataSource` yields bare strings; the preprocessors expect `{"text": line}`."""
    return dataset.map(lambda line: {"text": line}, num_parallel_calls=tf.data.AUTOTUNE)


def inputs_as_text(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Text-to-text examples -> `{"text": inputs}`: a task's inputs as plain text for a pre-training objective."""
    return dataset.map(lambda ex: {"text": ex["inputs"]}, num_parallel_calls=tf.data.AUTOTUNE)


def tokenize_text() -> list[Callable[..., tf.data.Dataset]]:
    """The first steps over a `text` field: rekey it to `targets`, tokenize, then SeqIO's cache placeholder."""
    return [
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
        seqio.CacheDatasetPlaceholder(),
    ]


def parse_tsv_lines(dataset: tf.data.Dataset, columns: Sequence[str]) -> tf.data.Dataset:
    """Lines `a<TAB>b<TAB>...` (from `seqio.TextLineDataSource`) -> `{column: string}`."""

    def parse(line: tf.Tensor) -> dict[str, tf.Tensor]:
        fields = tf.strings.split(line, "\t")
        check = tf.debugging.assert_equal(
            tf.size(fields), len(columns), message=f"a TSV line does not have the {len(columns)} columns {list(columns)}"
        )
        with tf.control_dependencies([check]):
            return {name: fields[i] for i, name in enumerate(columns)}

    return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def split_token_stream(dataset: tf.data.Dataset, chunk_length: int) -> tf.data.Dataset:
    """Concatenates the `targets` of all examples and splits the stream into `chunk_length`-token chunks.

    Only the stream's last chunk may be shorter. Output examples have only `targets`.
    """
    dtype = dataset.element_spec["targets"].dtype
    # A scan carries the tokens left over from earlier documents, so each step
    # emits whole chunks as rows of one dense tensor (far faster than unbatching
    # to single tokens). A final empty marker flushes the last partial chunk,
    # zero-padded to a full row and cut back to its length after the unbatch.
    documents = dataset.map(lambda ex: (ex["targets"], False))
    end_marker = tf.data.Dataset.from_tensors((tf.zeros([0], dtype), True))

    def emit_chunks(carry: tf.Tensor, document) -> tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor]]:
        tokens, is_end = document
        stream = tf.concat([carry, tokens], axis=0)
        size = tf.size(stream)
        num_rows = tf.where(is_end, -(-size // chunk_length), size // chunk_length)
        num_emitted = tf.minimum(num_rows * chunk_length, size)
        padding = [[0, num_rows * chunk_length - num_emitted]]
        rows = tf.reshape(tf.pad(stream[:num_emitted], padding), [num_rows, chunk_length])
        row_lengths = tf.minimum(chunk_length, num_emitted - chunk_length * tf.range(num_rows))
        return stream[num_emitted:], (rows, row_lengths)

    chunks = documents.concatenate(end_marker).scan(tf.zeros([0], dtype), emit_chunks)
    return chunks.unbatch().map(lambda row, length: {"targets": row[:length]})


@gin.configurable(denylist=["dataset", "output_features", "sequence_length"])
def fit_to_length(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    sequence_length: Mapping[str, int] | None = None,
    long_sequences: str = "truncate",
) -> tf.data.Dataset:
    """The last preprocessor of a text-to-text task: appends EOS, fitting each feature to its length.

    `long_sequences` (gin) chooses what an example longer than its length (EOS included) gets:
    "truncate" keeps its first tokens (seqio's `append_eos_after_trim`, T5's choice), "error"
    fails the pipeline with a message naming the feature and the length.
    """
    if long_sequences not in ("truncate", "error"):
        raise ValueError(f"fit_to_length.long_sequences must be 'truncate' or 'error', got {long_sequences!r}.")
    if long_sequences == "truncate" or sequence_length is None:
        return seqio.preprocessors.append_eos_after_trim(dataset, output_features, sequence_length)

    @seqio.map_over_dataset
    def check(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        for key, length in sequence_length.items():
            if key in features and key in output_features and output_features[key].add_eos and length is not None:
                tf.debugging.assert_less_equal(
                    tf.shape(features[key])[-1] + 1, length,
                    message=f"An example's {key!r} (with EOS) {LONG_SEQUENCE_ERROR} ({length} tokens)",
                )
        return features

    return seqio.preprocessors.append_eos(check(dataset), output_features)
