"""T5 v1.0, T5 v1.1 / Flan-T5, UL2, mT5 and umT5 <-> Hugging Face `T5ForConditionalGeneration` /
`MT5ForConditionalGeneration` / `UMT5ForConditionalGeneration`.

Both implementations leave attention logits unscaled and use RMS norms without bias, so weights map
one to one; only layouts differ. torch `Linear` weights are [out, in]; our kernels are [in, out]
with attention split per head: query/key/value [embed, heads, kv], out [heads, kv, embed]. Relative
position tables are [buckets, heads] in HF and [heads, buckets] here.

The output layer: v1.0 ties it to the embedding and scales the decoder output by d_model**-0.5; v1.1
has a separate `lm_head` and no scaling. `config.json` states the scaling (`tie_word_embeddings` in
older files, `scale_decoder_outputs` in transformers 5, which always writes `tie_word_embeddings:
true`); whether the head is separate is read from the weights (is `lm_head.weight` there, and does it
differ from `shared.weight`?). mT5 never scales. Unusual mixes import as an untied head with any
scaling folded in. umT5 (`relative_bias_per_layer`: a relative-position table in every layer's
self-attention) always scales in transformers 5, so an untied umT5 head exports with the scale divided
out of `lm_head.weight`. Export writes model_type `umt5` for per-layer tables, `mt5` for mT5's 250,112-id
vocabulary with an untied head, else `t5`.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterator, Mapping

import numpy as np

from t5x_lite.hf import registry, tensor_map
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5, T5Config

FEED_FORWARD_PROJ = {"relu": "relu", "gated-gelu": "gated-gelu", "gated-silu": "gated-silu", "gated-swish": "gated-silu"}
MT5_VOCAB_SIZE = 250112
ARCHITECTURES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration",
                 "umt5": "UMT5ForConditionalGeneration"}

# Tensors of HF files that duplicate others (tied copies) or that HF itself never uses.
IGNORED = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
    "lm_head.weight",  # a copy of shared.weight when the head is tied
)


def _entries(config: T5Config) -> Iterator[tensor_map.Entry]:
    """The tensor map: every parameter, the untied head included."""
    mlp = ("wi_0", "wi_1", "wo") if config.feed_forward.startswith("gated-") else ("wi", "wo")

    def attention(hf: str, ours: tuple) -> Iterator[tensor_map.Entry]:
        for hf_name, our_name in (("q", "query"), ("k", "key"), ("v", "value")):
            yield f"{hf}.{hf_name}.weight", (*ours, our_name, "kernel"), "qkv"
        yield f"{hf}.o.weight", (*ours, "out", "kernel"), "out"

    def relpos_bias(hf_layer: str, ours: tuple) -> Iterator[tensor_map.Entry]:
        yield f"{hf_layer}.0.SelfAttention.relative_attention_bias.weight", (*ours, "relpos_bias", "rel_embedding"), "transpose"

    def norm(hf: str, ours: tuple) -> Iterator[tensor_map.Entry]:
        yield f"{hf}.layer_norm.weight", (*ours, "scale"), "same"

    def feed_forward(hf: str, ours: tuple) -> Iterator[tensor_map.Entry]:
        for name in mlp:
            yield f"{hf}.DenseReluDense.{name}.weight", (*ours, "mlp", name, "kernel"), "transpose"

    yield "shared.weight", ("token_embedder", "embedding"), "same"
    for stack in ("encoder", "decoder"):
        if not config.relative_bias_per_layer:
            yield from relpos_bias(f"{stack}.block.0.layer", (stack,))
        yield f"{stack}.final_layer_norm.weight", (stack, f"{stack}_norm", "scale"), "same"
    for i in range(config.num_encoder_layers):
        hf, ours = f"encoder.block.{i}.layer", ("encoder", "layers", i)
        if config.relative_bias_per_layer:
            yield from relpos_bias(hf, ours)
        yield from attention(f"{hf}.0.SelfAttention", (*ours, "attention"))
        yield from norm(f"{hf}.0", (*ours, "pre_attention_layer_norm"))
        yield from feed_forward(f"{hf}.1", ours)
        yield from norm(f"{hf}.1", (*ours, "pre_mlp_layer_norm"))
    for i in range(config.num_decoder_layers):
        hf, ours = f"decoder.block.{i}.layer", ("decoder", "layers", i)
        if config.relative_bias_per_layer:
            yield from relpos_bias(hf, ours)
        yield from attention(f"{hf}.0.SelfAttention", (*ours, "self_attention"))
        yield from norm(f"{hf}.0", (*ours, "pre_self_attention_layer_norm"))
        yield from attention(f"{hf}.1.EncDecAttention", (*ours, "encoder_decoder_attention"))
        yield from norm(f"{hf}.1", (*ours, "pre_cross_attention_layer_norm"))
        yield from feed_forward(f"{hf}.2", ours)
        yield from norm(f"{hf}.2", (*ours, "pre_mlp_layer_norm"))
    if not config.tie_word_embeddings:
        yield "lm_head.weight", ("logits_dense", "kernel"), "transpose"


def _scales_decoder_output(hf_config: Mapping) -> bool:
    if hf_config.get("model_type") == "mt5":  # never scaled (transformers 5 writes tie_word_embeddings: true)
        return False
    if "scale_decoder_outputs" in hf_config:
        return bool(hf_config["scale_decoder_outputs"])
    return hf_config.get("tie_word_embeddings", True) is not False


def config_from_hf(hf_config: Mapping, weights: Mapping[str, np.ndarray]) -> T5Config:
    """Our `T5Config` for a HF T5/mT5 `config.json` (and its weights, for the head)."""
    proj = registry.translate(hf_config, "feed_forward_proj", "relu", FEED_FORWARD_PROJ, "T5 (v1.0, v1.1, mT5)")
    layers = hf_config.get("num_layers", 6)
    decoder_layers = hf_config.get("num_decoder_layers")
    return T5Config(
        vocab_size=hf_config.get("vocab_size", 32128),
        d_model=hf_config.get("d_model", 512),
        num_heads=hf_config.get("num_heads", 8),
        head_dim=hf_config.get("d_kv", 64),
        d_ff=hf_config.get("d_ff", 2048),
        num_encoder_layers=layers,
        num_decoder_layers=layers if decoder_layers is None else decoder_layers,
        dropout_rate=float(hf_config.get("dropout_rate", 0.1)),
        relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
        feed_forward=proj,
        tie_word_embeddings=_scales_decoder_output(hf_config) and not tensor_map.untied_head(weights, ("shared.weight",)),
        layer_norm_epsilon=float(hf_config.get("layer_norm_epsilon", 1e-6)),
        relative_bias_per_layer=hf_config.get("model_type") == "umt5",
    )


def _model_type(config: T5Config) -> str:
    """umt5 for per-layer relative tables, mt5 for mT5's vocabulary with an untied head, else t5."""
    if config.relative_bias_per_layer:
        return "umt5"
    return "mt5" if config.vocab_size == MT5_VOCAB_SIZE and not config.tie_word_embeddings else "t5"


def config_to_hf(config: T5Config, decoder_start_id: int = 0) -> dict:
    """A `config.json` that transformers 4 and 5 both read as this model, decoding from `decoder_start_id`."""
    model_type = _model_type(config)
    return {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.head_dim,
        "d_ff": config.d_ff,
        "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.dropout_rate,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "feed_forward_proj": config.feed_forward,
        "tie_word_embeddings": config.tie_word_embeddings or model_type == "umt5",
        "is_encoder_decoder": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": decoder_start_id,
    }


def params_from_hf(weights: Mapping[str, np.ndarray], hf_config: Mapping, config: T5Config) -> dict:
    """Our unscanned parameters from HF tensors; a missing or unexpected tensor is named in the error.

    An untied head is `lm_head.weight` (else `shared.weight`), with a scaled decoder output folded in."""
    prepared = {}
    source = next((name for name in ("lm_head.weight", "shared.weight") if name in weights), None)
    if not config.tie_word_embeddings and source is not None:
        head = tensor_map.to_numpy(weights[source])
        if _scales_decoder_output(hf_config):  # a scaled, untied head: fold the scale into the kernel
            head = head * np.float32(config.d_model**-0.5)
        prepared["lm_head.weight"] = head
    return tensor_map.params_from_hf(
        ChainMap(prepared, weights), list(_entries(config)), tensor_map.param_shapes(T5, config),
        "a T5ForConditionalGeneration", IGNORED,
    )


def params_to_hf(params: Mapping, config: T5Config) -> dict[str, np.ndarray]:
    """HF tensors from our unscanned parameters (no `lm_head.weight` when tied, as transformers writes;
    an untied umT5 head with transformers' decoder-output scale divided out)."""
    tensors = tensor_map.params_to_hf(params, list(_entries(config)))
    if config.relative_bias_per_layer and not config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["lm_head.weight"] * np.float32(config.d_model**0.5)
    return tensors


FAMILY = registry.register(registry.Family(
    name="t5", model_types=("t5", "mt5", "umt5"), config_class=T5Config, build_model=EncoderDecoderModel,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf, params_to_hf=params_to_hf,
    checkpoint_fields=("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers",
                       "num_decoder_layers", "relative_attention_num_buckets", "relative_attention_max_distance",
                       "feed_forward", "tie_word_embeddings", "layer_norm_epsilon", "relative_bias_per_layer"),
    settings=("decoder_start_id",), settings_from_hf=lambda hf_config: registry.decoder_start_from_hf(hf_config, 0),
))
