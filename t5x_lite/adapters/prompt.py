"""Prompt tuning (Lester et al., 2021): a learned soft prompt prepended to the input embeddings.

The prompt is `length` vectors of the model width placed before each example's tokens: before the
encoder's inputs in an encoder-decoder (T5, BART), before the whole row (inputs and targets) in a
decoder-only model (GPT), where it is part of the context every later position attends to.

How it reaches the network without a second code path: `apply_prompt` swaps the network's token
embedder for a `PromptedEmbed` that holds the same embedding table plus the prompt, and gives the
prompt's positions the ids `vocab_size + i` (i < length), which no vocabulary produces. The models
prepend those ids to each row (`prompted_encoder_batch`, `prompted_decoder_batch`), so every mask
built from ids > 0 covers the prompt, the learned positions of BART and GPT count it, and cached
decoding (the encoder run once, GPT's prefill) carries it like any input token.

The trainable parameter is the prompt's offset from its initial vectors (zeros at the start), and the
initial vectors are read from the network's embedding table on every call: sampled vocabulary
embeddings (`init='vocab'`, seeded) or the class labels' embeddings (`init='labels'`: each label
string tokenised with the task vocabulary and its pieces averaged, the labels cycled to fill the
length). So the prompt starts from the embeddings of the checkpoint the run loads (INITIAL_CHECKPOINT_PATH),
not from the random ones the network was built with; the init settings are part of the model config,
like LoRA's rank, and must be the same when the adapter is restored. Rows are unpacked (each example
gets its own prompt): a packed batch is an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_lite import partitioning
from t5x_lite.adapters import AdapterParam
from t5x_lite.networks.bart import Bart
from t5x_lite.networks.config_checks import ConfigError
from t5x_lite.networks.gpt import GPT
from t5x_lite.networks.t5 import T5
from t5x_lite.nn import layers

# The networks whose models (`EncoderDecoderModel`, `BartModel`, `DecoderOnlyModel`, `PrefixLMModel`) prepend it.
PROMPTED_NETWORKS = (T5, Bart, GPT)

INITS = ("vocab", "labels")
# The vocabulary ids `init='vocab'` samples from by default: sentencepiece orders pieces by frequency,
# so these are the most common ones (Lester et al. sample from the 5,000 most common tokens); the first
# three ids (padding, EOS, unknown) are left out.
FIRST_SAMPLED_ID = 3


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """A soft prompt: `length` vectors, initialised from `init` ('vocab': embeddings of ids sampled with
    `seed` from the `sample_size` most frequent pieces; 'labels': the averaged embeddings of each of
    `labels`, tokenised with the task's `vocabulary` (a seqio vocabulary, e.g. `@get_vocabulary()`), cycled)."""

    length: int = 20
    init: str = "vocab"
    labels: Sequence[str] = ()
    seed: int = 0
    sample_size: int = 5000
    vocabulary: Any = None

    def __post_init__(self):
        if not isinstance(self.length, int) or self.length < 1:
            raise ConfigError(f"PromptConfig.length must be a whole number >= 1, got {self.length!r}.")
        if self.init not in INITS:
            raise ConfigError(f"PromptConfig.init must be one of {list(INITS)}, got {self.init!r}.")
        if self.init == "labels" and (not self.labels or self.vocabulary is None):
            raise ConfigError(
                "PromptConfig.init = 'labels' needs PromptConfig.labels (e.g. ['yes', 'no']) and the task's "
                "PromptConfig.vocabulary (e.g. @get_vocabulary())."
            )
        if self.sample_size <= FIRST_SAMPLED_ID:
            raise ConfigError(f"PromptConfig.sample_size must be > {FIRST_SAMPLED_ID}, got {self.sample_size}.")


def sampled_ids(length: int, vocab_size: int, sample_size: int, seed: int) -> np.ndarray:
    """[length] distinct ids (if there are enough) drawn with `seed` from the `sample_size` most frequent."""
    pool = np.arange(FIRST_SAMPLED_ID, min(sample_size, vocab_size))
    return np.random.default_rng(seed).choice(pool, size=length, replace=length > len(pool))


def label_ids(labels: Sequence[str], vocabulary: Any) -> list[list[int]]:
    """Each label's piece ids under `vocabulary` (a seqio vocabulary; no EOS); an empty one is an error."""
    pieces = [list(vocabulary.encode(label)) for label in labels]
    for label, ids in zip(labels, pieces):
        if not ids:
            raise ValueError(f"PromptConfig.labels: {label!r} has no tokens under the vocabulary.")
    return pieces


def initial_rows(config: PromptConfig, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [length, k], weights [length, k]): prompt vector i starts as sum_j weights[i, j] * embedding[ids[i, j]]."""
    if config.init == "vocab":
        ids = sampled_ids(config.length, vocab_size, config.sample_size, config.seed)
        return ids[:, None].astype(np.int32), np.ones((config.length, 1), np.float32)
    pieces = label_ids(config.labels, config.vocabulary)
    cycled = [pieces[i % len(pieces)] for i in range(config.length)]
    width = max(len(p) for p in cycled)
    ids = np.zeros((config.length, width), np.int32)
    weights = np.zeros((config.length, width), np.float32)
    for i, p in enumerate(cycled):
        ids[i, : len(p)] = p
        weights[i, : len(p)] = 1.0 / len(p)
    if ids.max() >= vocab_size:
        raise ValueError(f"PromptConfig.labels have token id {ids.max()} outside the model's vocab_size {vocab_size}.")
    return ids, weights


class PromptedEmbed(layers.Embed):
    """A token embedding whose ids `vocab_size + i` (i < prompt length) embed as soft prompt vector i.

    Holds the wrapped embedding's table (same parameter, same path `embedding`) and the prompt's offset
    `prompt` [length, embed], an `AdapterParam` (zeros at the start: the prompt begins as its initial rows)."""

    def __init__(self, base: layers.Embed, config: PromptConfig):
        self.embedding = base.embedding
        self.kernels = base.kernels
        self.dtype = base.dtype
        ids, weights = initial_rows(config, self.vocab_size)
        self.init_ids = tuple(map(tuple, ids.tolist()))
        self.init_weights = tuple(map(tuple, weights.tolist()))
        features = self.embedding.shape[1]
        self.prompt = AdapterParam(jnp.zeros((config.length, features), jnp.float32), logical_axes=(None, "embed"))

    @property
    def vocab_size(self) -> int:
        return self.embedding.shape[0]

    @property
    def length(self) -> int:
        return self.prompt.shape[0]

    def prompt_vectors(self) -> jax.Array:
        """[length, embed] float32: the initial rows of the (current) table plus the trained offset."""
        rows = jnp.take(self.embedding[...], jnp.asarray(self.init_ids), axis=0)
        initial = jnp.einsum("lk,lke->le", jnp.asarray(self.init_weights, jnp.float32), rows)
        return initial + self.prompt[...]

    def prompt_ids(self, rows: int) -> jax.Array:
        """[rows, length] int32: the ids that stand for the prompt's positions."""
        return jnp.broadcast_to(self.vocab_size + jnp.arange(self.length, dtype=jnp.int32), (rows, self.length))

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Embeddings [b, s, embed]: table rows for vocabulary ids, prompt vectors for the prompt's ids."""
        x = super().__call__(jnp.minimum(ids, self.vocab_size - 1))
        index = jnp.clip(ids - self.vocab_size, 0, self.length - 1)
        prompt = jnp.take(self.prompt_vectors(), index, axis=0).astype(x.dtype)
        x = jnp.where((ids >= self.vocab_size)[..., None], prompt, x)
        return partitioning.constrain(x, "embeddings", layers.EMBED_AXES)


def apply_prompt(network: nnx.Module, config: PromptConfig) -> None:
    """Gives `network` (T5, BART or GPT) a soft prompt, in place."""
    if type(network) not in PROMPTED_NETWORKS:
        raise ValueError(
            f"Prompt tuning supports the T5, BART and GPT networks (their models prepend the prompt); MODEL "
            f"builds {type(network).__name__}."
        )
    network.token_embedder = PromptedEmbed(network.token_embedder, config)


def soft_prompt(network: nnx.Module) -> PromptedEmbed | None:
    """The network's prompted embedder, or None when it has no soft prompt."""
    embedder = getattr(network, "token_embedder", None)
    return embedder if isinstance(embedder, PromptedEmbed) else None


def _check_unpacked(feature_keys: Sequence[str]) -> None:
    """Packed rows hold several examples, each of which would need its own prompt: refused."""
    packed = sorted(k for k in feature_keys if k.endswith("_segment_ids"))
    if packed:
        raise ValueError(
            f"Prompt tuning needs unpacked rows (one example each, behind its own prompt), got {packed}; "
            "set --gin.get_dataset.pack=False."
        )


def _prepend(values: jax.Array, prefix: jax.Array) -> jax.Array:
    return jnp.concatenate([prefix.astype(values.dtype), values], axis=1)


def prompted_encoder_batch(network: nnx.Module, batch: Mapping[str, jax.Array]) -> Mapping[str, jax.Array]:
    """`batch` with the prompt's ids before each row's `encoder_input_tokens` (unchanged without a prompt)."""
    embedder = soft_prompt(network)
    if embedder is None:
        return batch
    _check_unpacked(list(batch))
    inputs = batch["encoder_input_tokens"]
    return {**batch, "encoder_input_tokens": _prepend(inputs, embedder.prompt_ids(inputs.shape[0]))}


def prompted_decoder_batch(network: nnx.Module, batch: Mapping[str, jax.Array]) -> tuple[Mapping[str, jax.Array], int]:
    """(`batch` with the prompt's ids before each row's `decoder_input_tokens`, marked as inputs in
    `decoder_causal_attention` when present; the prompt length, whose logits the caller drops so they
    align with the unchanged targets). Without a prompt: (`batch`, 0)."""
    embedder = soft_prompt(network)
    if embedder is None:
        return batch, 0
    _check_unpacked(list(batch))
    tokens = batch["decoder_input_tokens"]
    prompted = {**batch, "decoder_input_tokens": _prepend(tokens, embedder.prompt_ids(tokens.shape[0]))}
    if "decoder_causal_attention" in batch:
        causal = batch["decoder_causal_attention"]
        prompted["decoder_causal_attention"] = _prepend(causal, jnp.ones((causal.shape[0], embedder.length)))
    return prompted, embedder.length


def check_lengths(network: nnx.Module, task_feature_lengths: Mapping[str, int], feature_keys: Sequence[str]) -> None:
    """Before training: the rows must be unpacked, and the prompt plus the inputs (decoder-only: plus the
    targets) must fit the network's learned positions (BART, GPT; T5's relative positions have no limit)."""
    embedder = soft_prompt(network)
    if embedder is None:
        return
    _check_unpacked(feature_keys)
    limit = getattr(network.config, "max_position_embeddings", None)
    decoder_only = not hasattr(network, "encode")
    features = ("inputs", "targets") if decoder_only else ("inputs",)
    used = sum(task_feature_lengths.get(name, 0) for name in features)
    if limit is not None and embedder.length + used > limit:
        spelled = " + ".join(f"{name} {task_feature_lengths.get(name, 0)}" for name in features)
        raise ValueError(
            f"The soft prompt ({embedder.length} positions) + {spelled} = {embedder.length + used} exceeds the "
            f"model's {limit} learned positions; shorten PromptConfig.length or TASK_FEATURE_LENGTHS."
        )
