"""Frozen features (ELMo style): an encoder's hidden states of chosen layers, for downstream use
without fine-tuning. Works for BERT, ELECTRA's discriminator, DeBERTa, and the encoders of T5 and T5Gemma
(`FAMILIES`: one entry per network class says how to read its hidden states, its depth and its inputs).

Layers are numbered as Hugging Face's `output_hidden_states`: 0 is the embedding output, i is the
output of block i, n (or -1) the last; for T5 and T5Gemma the last entry is the encoder output after its
final norm (what `encode` returns, and what the decoder reads).

`extract_features(network, tokens, layers=[0, -1])` -> `{layer: [b, s, d] array}`. `python -m t5x_lite.features`
(docs/finetuning.md) runs it over a text file (a line holding a TAB is a sentence pair for the families with
[CLS]/[SEP] inputs) or a task split's `inputs` (`MIXTURE_OR_TASK_NAME`, `FEATURES_SPLIT`) and writes an .npz with
`layer_<i>` per layer ([n, length, d] float32, or [n, d] with `pooling`), `tokens` [n, length] and `mask`
[n, length] (True at real tokens).
"""

from __future__ import annotations

from t5x_lite import cli

if __name__ == "__main__":
    cli.exit_on_help(cli.FEATURES_REQUIRED_MACROS)  # before the imports below load TensorFlow: --help answers at once
cli.keep_tensorflow_off_gpus()  # first: the imports below load TensorFlow (its C++ start-up logs held back)

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import nnx

import t5x_lite.configurables  # noqa: F401  (declares the gin configurables the gin files name)
from t5x_lite import checkpoints, partitioning, storage
from t5x_lite.data import special_tokens, vocab
from t5x_lite.models.base import BaseModel
from t5x_lite.networks.bert import Bert
from t5x_lite.networks.deberta import Deberta
from t5x_lite.networks.electra import Electra
from t5x_lite.networks.t5 import T5
from t5x_lite.networks.t5gemma import T5Gemma

POOLINGS = ("none", "mean", "cls")

# (network, tokens, segment_ids, token_type_ids) -> [embedding output, block 1, ..., block n]
StatesFn = Callable[[nnx.Module, jax.Array, jax.Array | None, jax.Array | None], list[jax.Array]]


@dataclasses.dataclass(frozen=True)
class Family:
    """How frozen features read one network family."""

    name: str
    states: StatesFn
    num_layers: Callable[[Any], int]  # config -> blocks of the encoder the features come from
    bert_inputs: bool  # `[CLS] A [SEP] (B [SEP])` rows with token types; else `text EOS`


def _encoder_states(network: Bert | Deberta, tokens, segment_ids, token_type_ids) -> list[jax.Array]:
    """BERT's and DeBERTa's `encode(..., return_hidden_states=True)` states."""
    return network.encode(tokens, segment_ids, token_type_ids=token_type_ids, return_hidden_states=True)[1]


def _discriminator_states(network: Electra, tokens, segment_ids, token_type_ids) -> list[jax.Array]:
    """ELECTRA's discriminator states (the encoder its downstream heads read)."""
    return network.discriminator_hidden_states(tokens, segment_ids, token_type_ids=token_type_ids)


def _encoder_decoder_states(network: T5 | T5Gemma, tokens, segment_ids, token_type_ids) -> list[jax.Array]:
    """The encoder's states of an encoder-decoder network (no token types)."""
    if token_type_ids is not None:
        raise ValueError(f"{type(network).__name__} has no token types; pass token_type_ids only for "
                         f"{', '.join(f.name for f in FAMILIES.values() if f.bert_inputs)}.")
    return network.encoder_hidden_states(tokens, segment_ids)


FAMILIES: dict[type, Family] = {
    Bert: Family("BERT", _encoder_states, lambda config: config.num_layers, bert_inputs=True),
    Electra: Family("ELECTRA", _discriminator_states, lambda config: config.num_layers, bert_inputs=True),
    Deberta: Family("DeBERTa", _encoder_states, lambda config: config.num_layers, bert_inputs=True),
    T5: Family("T5", _encoder_decoder_states, lambda config: config.num_encoder_layers, bert_inputs=False),
    T5Gemma: Family("T5Gemma", _encoder_decoder_states, lambda config: config.encoder_num_layers, bert_inputs=False),
}


def supported_families() -> str:
    """"BERT, ELECTRA, ... or T5Gemma": the names an error about an unsupported network lists."""
    names = [family.name for family in FAMILIES.values()]
    return f"{', '.join(names[:-1])} or {names[-1]}"


def registered_family(network_type: type) -> Family | None:
    """The family of a network class or of its nearest registered base (DeBERTa-v3's RTD network is a
    `Deberta`: its features are the discriminator's), None for an unsupported class."""
    return next((FAMILIES[base] for base in network_type.__mro__ if base in FAMILIES), None)


def family_of(network_type: type) -> Family:
    """The features family of a network class; any other is a TypeError naming the supported families."""
    family = registered_family(network_type)
    if family is None:
        raise TypeError(f"Frozen features need a {supported_families()} network, got {network_type.__name__}.")
    return family


def hidden_states(
    network: nnx.Module,
    tokens: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
) -> list[jax.Array]:
    """[embedding output, block 1, ..., block n] of the network's encoder, each [b, s, d]."""
    return family_of(type(network)).states(network, tokens, segment_ids, token_type_ids)


def layer_indices(layers: Sequence[int], num_layers: int) -> list[int]:
    """Layer numbers in 0..num_layers (negative counts from the end); an invalid one is a ValueError."""
    out = []
    for layer in layers:
        index = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= index <= num_layers:
            raise ValueError(
                f"Layer {layer} does not exist: this encoder has layers 0 (embeddings) to {num_layers} "
                f"(or -1 to -{num_layers + 1})."
            )
        out.append(index)
    return out


def extract_features(
    network: nnx.Module,
    tokens: jax.Array,
    layers: Sequence[int] = (-1,),
    *,
    segment_ids: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
) -> dict[int, jax.Array]:
    """{layer: [b, s, d] hidden states} for the chosen `layers` (see the module docstring for the
    numbering; negative numbers count from the end and are returned under their positive number)."""
    family = family_of(type(network))
    indices = layer_indices(layers, family.num_layers(network.config))  # before any computation
    states = family.states(network, tokens, segment_ids, token_type_ids)
    return {i: states[i] for i in indices}


def pool(features: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
    """[b, s, d] -> [b, s, d] ("none"), the mean over real tokens [b, d] ("mean") or position 0 ("cls")."""
    if pooling == "none":
        return features
    if pooling == "cls":
        return features[:, 0]
    if pooling == "mean":
        weights = mask.astype(jnp.float32)[..., None]
        return jnp.sum(features.astype(jnp.float32) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    raise ValueError(f"Unknown pooling {pooling!r}; use one of {list(POOLINGS)}.")


# ------------------------------------------------------------------ inputs for the CLI


def bert_token_types(tokens: np.ndarray, sep_id: int) -> np.ndarray:
    """0 up to and including the first [SEP], 1 after it, 0 on padding (BERT's segment A/B)."""
    seps_before = np.cumsum(tokens == sep_id, axis=-1) - (tokens == sep_id)
    return (np.minimum(seps_before, 1) * (tokens > 0)).astype(np.int32)


def encode_lines(lines: Sequence[str], length: int, bert_inputs: bool) -> np.ndarray:
    """[n, length] int32 ids: `[CLS] A [SEP] (B [SEP])` (a TAB separates A and B) for the families with
    `bert_inputs`, else `text EOS` (T5, T5Gemma)."""
    vocabulary = vocab.get_vocabulary()
    rows = np.zeros((len(lines), length), np.int32)
    for i, line in enumerate(lines):
        if bert_inputs:
            special = special_tokens.bert_special_ids(vocabulary)
            parts = [vocabulary.encode(part) for part in line.split("\t")[:2]]
            budget = length - len(parts) - 1
            if len(parts) == 2:
                keep_a = min(len(parts[0]), max(budget - len(parts[1]), budget - budget // 2))
                parts = [parts[0][:keep_a], parts[1][: budget - keep_a]]
            else:
                parts = [parts[0][:budget]]
            ids = [special.cls, *parts[0], special.sep] + ([*parts[1], special.sep] if len(parts) == 2 else [])
        else:
            ids = [*vocabulary.encode(line)[: length - 1], vocabulary.eos_id]
        rows[i, : len(ids)] = ids
    return rows


def task_inputs(task: seqio.Task, split: str, length: int, max_examples: int | None) -> np.ndarray:
    """[n, length] the task split's `inputs` as the task tokenizes them (shorter ones padded)."""
    lengths = {name: length for name in task.output_features}
    ds = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1)
    if max_examples:
        ds = ds.take(max_examples)
    inputs = [ex["inputs"][:length] for ex in ds.as_numpy_iterator()]
    rows = np.zeros((len(inputs), length), np.int32)
    for i, ids in enumerate(inputs):
        rows[i, : len(ids)] = ids
    return rows


@gin.configurable
def save_features(
    *,
    model: BaseModel = gin.REQUIRED,
    checkpoint_path: str = gin.REQUIRED,
    output_file: str = gin.REQUIRED,
    layers: Sequence[int] = (-1,),
    input_file: str | None = None,
    mixture_or_task_name: str | None = None,
    mixture_or_task_module: str | None = None,
    split: str = "validation",
    sequence_length: int = 128,
    batch_size: int = 32,
    max_examples: int | None = None,
    pooling: str = "none",
) -> dict[str, np.ndarray]:
    """Runs the checkpoint's encoder over a text file or a task split and saves chosen layers (.npz).

    Returns the saved arrays. `pooling`: "none" (per token), "mean" (over real tokens) or "cls".
    """
    if (input_file is None) == (mixture_or_task_name is None):
        raise cli.UserError("Set exactly one of FEATURES_INPUT_FILE and MIXTURE_OR_TASK_NAME.")
    if pooling not in POOLINGS:
        raise cli.UserError(f"pooling {pooling!r} is not one of {list(POOLINGS)}.")
    family = model_family(model)
    with cli.user_errors(ValueError, setting="FEATURE_LAYERS"):
        indices = layer_indices(layers, family.num_layers(model.config))
    mesh = partitioning.make_mesh()
    rules = partitioning.logical_axis_rules()
    graphdef, params = checkpoints.load_checkpoint_params(model, checkpoint_path, mesh, rules)

    if input_file is not None:
        lines = cli.read_lines(input_file, "FEATURES_INPUT_FILE", "text")
        tokens = encode_lines(lines[:max_examples] if max_examples else lines, sequence_length, family.bert_inputs)
    else:
        task = cli.load_task(mixture_or_task_name, mixture_or_task_module)
        if isinstance(task, seqio.Mixture) or split not in task.splits:
            raise cli.UserError(f"MIXTURE_OR_TASK_NAME {mixture_or_task_name!r} must be a task with a split {split!r}.")
        tokens = task_inputs(task, split, sequence_length, max_examples)

    sep_id = special_tokens.bert_special_ids(vocab.get_vocabulary()).sep if family.bert_inputs else None

    @jax.jit
    def run(params, batch):
        features = extract_features(
            nnx.merge(graphdef, params), batch["tokens"], indices, token_type_ids=batch.get("token_types")
        )
        mask = batch["tokens"] > 0
        return {i: pool(f.astype(jnp.float32), mask, pooling) for i, f in features.items()}

    outputs: dict[int, list[np.ndarray]] = {i: [] for i in indices}
    for start in range(0, len(tokens), batch_size):
        rows = len(tokens[start : start + batch_size])
        batch = {"tokens": np.pad(tokens[start : start + batch_size], [(0, batch_size - rows), (0, 0)])}
        if family.bert_inputs:
            batch["token_types"] = bert_token_types(batch["tokens"], sep_id)
        features = jax.device_get(run(params, partitioning.whole_batch_to_mesh(batch, mesh, rules)))
        for i in indices:
            outputs[i].append(np.asarray(features[i])[:rows])
    arrays = {f"layer_{i}": np.concatenate(outputs[i]) for i in indices}
    arrays.update(tokens=tokens, mask=tokens > 0)
    output = storage.path(output_file if output_file.endswith(".npz") else f"{output_file}.npz")  # as np.savez names it
    cli.prepare_output_dir(str(output.parent))
    with output.open("wb") as f:  # a local path or gs://
        np.savez(f, **arrays)
    print(f"Wrote layers {indices} of {len(tokens)} examples to {output}.")
    return arrays


def model_family(model: BaseModel) -> Family:
    """The features family of the network MODEL builds (abstractly: before any checkpoint is read)."""
    network_type = type(nnx.eval_shape(lambda: model.build_network(nnx.Rngs(0))))
    family = registered_family(network_type)
    if family is None:
        raise cli.UserError(f"Frozen features need a {supported_families()} model; MODEL builds "
                            f"{network_type.__name__}.")
    return family


if __name__ == "__main__":
    cli.run_entry_point(save_features, cli.FEATURES_REQUIRED_MACROS)
