"""T5Gemma encoder-decoder network (Gemma-2 stacks as encoder and decoder) in Flax NNX.

What differs from T5: rotary positions (RoPE) instead of relative biases; grouped-query attention
(fewer key/value heads than query heads) with queries scaled by query_pre_attn_scalar**-0.5 and
attention logits soft-capped (tanh); RMS norms before AND after attention and feed-forward; layers that
alternate local (sliding-window) and global attention, starting local; embeddings scaled by sqrt(d_model);
output logits soft-capped. Encoder and decoder have their own widths, depths and head counts (e.g.
9B-2B), their own embedding tables, and the output layer is tied to the decoder's embedding by default.

Hugging Face's RMS norm multiplies by (1 + weight) with the weight initialised to 0; ours multiplies by
a scale initialised to 1 (the same function; hf/t5gemma.py adds or subtracts the 1).

Scanned layers: each stack's local/global pattern is an array of attention windows (one per layer,
`layers.FULL_WINDOW` for global layers) scanned along with the layer params, so one scanned layer body
serves both kinds.

Decoding: local decoder layers cache only W = min(sliding_window, max_decode_length) positions, as ring
buffers (position p in slot p % W; keys are cached after RoPE, so a slot needs no re-rotation), global
layers the whole decode length: the self-attention cache is a `WindowedCache` of two `StackCache`s, and
a scanned decode step is one `lax.scan` over (local, global) layer pairs, plus the trailing local layer
of an odd depth. `sliding_window=None` (every layer global) keeps one cache of all layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_lite import partitioning
from t5x_lite.networks.config_checks import ConfigError, check_config
from t5x_lite.networks.encoder_decoder import EncoderDecoderNetwork
from t5x_lite.nn import attention, kernels, layers, stacks
from t5x_lite.nn.attention import DecodeState, StackCache

STACK_FIELDS = ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff")


@dataclasses.dataclass(frozen=True)
class T5GemmaConfig:
    """Hyperparameters of a T5Gemma network; defaults are T5Gemma 2B-2B (Gemma 2 2B as both stacks).

    `encoder_*` and `decoder_*` size each stack; the attention settings (window, scaling, soft caps, RoPE
    base) are shared, as in every published T5Gemma. `sliding_window=None` makes every layer global.
    """

    vocab_size: int = 256000
    encoder_d_model: int = 2304
    encoder_num_layers: int = 26
    encoder_num_heads: int = 8
    encoder_num_kv_heads: int = 4
    encoder_head_dim: int = 256
    encoder_d_ff: int = 9216
    decoder_d_model: int = 2304
    decoder_num_layers: int = 26
    decoder_num_heads: int = 8
    decoder_num_kv_heads: int = 4
    decoder_head_dim: int = 256
    decoder_d_ff: int = 9216
    sliding_window: int | None = 4096
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True  # logits = decoder output @ decoder embedding.T (the published models)
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: str = "float32"  # activation dtype name, e.g. "bfloat16"
    remat_policy: str = "none"  # per-layer jax.checkpoint: "none", "full" or "dots" (see stacks.REMAT_POLICIES)
    scan_layers: bool = False  # stacked layer params (leading "layers" axis) applied with lax.scan
    attention_impl: str = "auto"  # "auto" (fused on GPU when no soft cap applies, else einsum), "einsum", "xla", "cudnn"
    kernels: str = "auto"  # KERNELS: "auto" (by backend), "xla" or "cpu_tuned" (see nn/kernels.py)

    def __post_init__(self):
        stack_fields = [f"{stack}_{field}" for stack in ("encoder", "decoder") for field in STACK_FIELDS]
        check_config(self, positive=("vocab_size", *stack_fields))
        for stack in ("encoder", "decoder"):
            heads, kv_heads = getattr(self, f"{stack}_num_heads"), getattr(self, f"{stack}_num_kv_heads")
            if heads % kv_heads:
                raise ConfigError(
                    f"T5GemmaConfig.{stack}_num_heads={heads} must be a multiple of {stack}_num_kv_heads={kv_heads}."
                )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"T5GemmaConfig.sliding_window={self.sliding_window} must be positive or None.")

    def stack(self, name: str) -> StackConfig:
        """The sizes of the "encoder" or "decoder" stack."""
        return StackConfig(**{field: getattr(self, f"{name}_{field}") for field in STACK_FIELDS})

    def windows(self, num_layers: int) -> tuple[int, ...]:
        """Each layer's attention window: local layers (even indices) the sliding window, global layers
        (odd) `layers.FULL_WINDOW`."""
        local = layers.FULL_WINDOW if self.sliding_window is None else self.sliding_window
        return tuple(local if i % 2 == 0 else layers.FULL_WINDOW for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """One stack's sizes (see `T5GemmaConfig.stack`)."""

    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int


def _attention(
    config: T5GemmaConfig, stack: StackConfig, ops: kernels.Kernels, rngs: nnx.Rngs, kv_features: int | None = None
) -> attention.GroupedQueryAttention:
    """Self-attention (rotary, `kv_features` None) or cross-attention (no positions) of one stack."""
    return attention.GroupedQueryAttention(
        stack.d_model, stack.num_heads, stack.num_kv_heads, stack.head_dim, kernels=ops,
        query_scale=config.query_pre_attn_scalar**-0.5, kv_features=kv_features,
        logit_cap=config.attn_logit_softcapping, rope_theta=None if kv_features else config.rope_theta,
        dropout_rate=config.attention_dropout_rate, implementation=config.attention_impl, dtype=config.dtype,
        rngs=rngs,
    )


def _mlp(config: T5GemmaConfig, stack: StackConfig, ops: kernels.Kernels, rngs: nnx.Rngs) -> layers.MlpBlock:
    """Gated GELU (tanh approximation, Gemma's gelu_pytorch_tanh): wo(gelu(wi_0 x) * wi_1 x)."""
    return layers.MlpBlock(
        stack.d_model, stack.d_ff, kernels=ops, activation="gated-gelu", dropout_rate=config.dropout_rate,
        dtype=config.dtype, rngs=rngs,
    )


def _norm(config: T5GemmaConfig, stack: StackConfig) -> layers.RMSNorm:
    return layers.RMSNorm(stack.d_model, eps=config.rms_norm_eps, dtype=config.dtype)


class EncoderLayer(nnx.Module):
    """Sandwich-normed bidirectional self-attention, then a sandwich-normed gated-GELU feed-forward."""

    def __init__(self, config: T5GemmaConfig, *, rngs: nnx.Rngs):
        stack, ops = config.stack("encoder"), kernels.resolve(config.kernels)
        self.kernels = ops
        self.pre_attention_norm = _norm(config, stack)
        self.attention = _attention(config, stack, ops, rngs)
        self.post_attention_norm = _norm(config, stack)
        self.pre_mlp_norm = _norm(config, stack)
        self.mlp = _mlp(config, stack, ops, rngs)
        self.post_mlp_norm = _norm(config, stack)
        self.dropout_rate = config.dropout_rate

    def __call__(
        self, x: jax.Array, positions: jax.Array, mask: jax.Array, window: jax.Array, dropout_rngs: nnx.Rngs | None
    ) -> jax.Array:
        drop = self.kernels.dropout
        mask = mask & layers.sliding_window_mask(positions, positions, window, causal=False)
        h = self.pre_attention_norm(x)
        h = self.attention(h, h, mask, q_positions=positions, kv_positions=positions, dropout_rngs=dropout_rngs)
        x = x + drop(self.post_attention_norm(h), self.dropout_rate, dropout_rngs)
        h = self.mlp(self.pre_mlp_norm(x), dropout_rngs=dropout_rngs)
        return x + drop(self.post_mlp_norm(h), self.dropout_rate, dropout_rngs)


class WindowedCache(NamedTuple):
    """A decoder stack's self-attention caches by layer kind, each a `StackCache` indexed by layer // 2:
    `local` the sliding-window layers' (0, 2, ...) ring buffers of min(window, decode length) slots,
    `full` the global layers' (1, 3, ...) caches of the whole decode length."""

    local: StackCache
    full: StackCache


class DecoderLayer(nnx.Module):
    """Sandwich-normed causal self-attention, cross-attention to the encoder, and feed-forward."""

    def __init__(self, config: T5GemmaConfig, *, rngs: nnx.Rngs):
        stack, ops = config.stack("decoder"), kernels.resolve(config.kernels)
        self.kernels = ops
        self.pre_self_attention_norm = _norm(config, stack)
        self.self_attention = _attention(config, stack, ops, rngs)
        self.post_self_attention_norm = _norm(config, stack)
        self.pre_cross_attention_norm = _norm(config, stack)
        self.cross_attention = _attention(config, stack, ops, rngs, kv_features=config.encoder_d_model)
        self.post_cross_attention_norm = _norm(config, stack)
        self.pre_mlp_norm = _norm(config, stack)
        self.mlp = _mlp(config, stack, ops, rngs)
        self.post_mlp_norm = _norm(config, stack)
        self.dropout_rate = config.dropout_rate

    def __call__(
        self,
        y: jax.Array,
        positions: jax.Array,
        encoded: jax.Array,
        self_mask: jax.Array,
        cross_mask: jax.Array,
        window: jax.Array,
        dropout_rngs: nnx.Rngs | None,
    ) -> jax.Array:
        drop = self.kernels.dropout
        self_mask = self_mask & layers.sliding_window_mask(positions, positions, window, causal=True)
        h = self.pre_self_attention_norm(y)
        h = self.self_attention(h, h, self_mask, q_positions=positions, kv_positions=positions,
                                dropout_rngs=dropout_rngs)
        y = y + drop(self.post_self_attention_norm(h), self.dropout_rate, dropout_rngs)
        h = self.cross_attention(self.pre_cross_attention_norm(y), encoded, cross_mask, dropout_rngs=dropout_rngs)
        y = y + drop(self.post_cross_attention_norm(h), self.dropout_rate, dropout_rngs)
        h = self.mlp(self.pre_mlp_norm(y), dropout_rngs=dropout_rngs)
        return y + drop(self.post_mlp_norm(h), self.dropout_rate, dropout_rngs)

    def decode_step(
        self, y: jax.Array, state: DecodeState, layer: int | jax.Array, cache: StackCache,
        cache_layer: int | jax.Array, window: int,
    ) -> tuple[jax.Array, StackCache]:
        """One position [b, 1, e] through decoder layer `layer` (its cross-attention keys in `state.cross`),
        whose self-attention keys are layer `cache_layer` of `cache`, read as a ring buffer of its length
        (`attention.ring_slot`; a cache of the whole decode length is a plain one); no dropout."""
        slots = attention.cache_length(cache)
        position = (state.index - state.first_slot)[:, None]  # [b, 1]
        visible = attention.ring_visible(state.index, state.first_slot, slots, window)
        h, cache = self.self_attention.decode_step(
            self.pre_self_attention_norm(y), cache, cache_layer, attention.ring_slot(state.index, slots),
            visible[:, None, None, :], position,
        )
        y = y + self.post_self_attention_norm(h)
        cross = attention.layer_cache(state.cross, layer)
        h = self.cross_attention.attend_cached(self.pre_cross_attention_norm(y), cross, state.cross_mask[:, None, None])
        y = y + self.post_cross_attention_norm(h)
        return y + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(y))), cache


class Stack(nnx.Module):
    """Scaled embeddings, the layers (with their local/global windows) and a final norm."""

    def __init__(self, config: T5GemmaConfig, name: str, make_layer, *, rngs: nnx.Rngs):
        stack = config.stack(name)
        self.kernels = kernels.resolve(config.kernels)
        self.layers = stacks.make_layers(make_layer, stack.num_layers, config.scan_layers, rngs)
        self.final_norm = _norm(config, stack)
        self.embed_scale = math.sqrt(stack.d_model)
        self.windows = config.windows(stack.num_layers)
        self.dtype = jnp.dtype(config.dtype)
        self.dropout_rate = config.dropout_rate
        self.scan_layers = config.scan_layers
        self.remat_policy = config.remat_policy

    def __call__(self, x: jax.Array, args: tuple, dropout_rngs: nnx.Rngs | None) -> jax.Array:
        """Embeddings [b, s, e] -> normed outputs; each layer takes (x, *args, its window, dropout_rngs)."""
        x = self.kernels.dropout(self.scale(x), self.dropout_rate, dropout_rngs)
        x = stacks.apply_layers(
            self.layers, x, args, dropout_rngs, scan=self.scan_layers, remat_policy=self.remat_policy,
            per_layer=(jnp.array(self.windows, jnp.int32),),
        )
        return self.kernels.dropout(self.final_norm(x), self.dropout_rate, dropout_rngs)

    def scale(self, x: jax.Array) -> jax.Array:
        """Embeddings times sqrt(d_model), the factor rounded to the activation dtype as Gemma does."""
        return x * jnp.asarray(self.embed_scale, self.dtype)

    def hidden_states(self, x: jax.Array, args: tuple) -> list[jax.Array]:
        """Embeddings [b, s, e] -> [scaled embeddings, layer 1, ..., layer n] without dropout, the last normed
        as `__call__` returns it (Hugging Face's `output_hidden_states`, for frozen features)."""
        x = self.scale(x)
        windows = jnp.array(self.windows, jnp.int32)

        def layer_output(layer: nnx.Module, x: jax.Array, i) -> tuple[jax.Array, jax.Array]:
            x = layer(x, *args, windows[i], None)
            return x, x

        _, outputs = stacks.each_layer(self.layers, layer_output, x, scan=self.scan_layers)
        states = [x, *stacks.per_layer(outputs)]
        return states[:-1] + [self.final_norm(states[-1])]


class T5Gemma(EncoderDecoderNetwork):
    """The T5Gemma encoder-decoder network: token ids in, float32 (soft-capped) logits out.

    Token id 0 is padding; packed rows carry segment ids and in-segment positions (the rotary positions).
    Decoder inputs start with the trainer model's `decoder_start_id` (0 by default; Hugging Face's T5Gemma
    checkpoints start with their BOS id 2, which import sets).
    Dropout is applied iff `dropout_rngs` is given and a rate is > 0.
    """

    def __init__(self, config: T5GemmaConfig, *, rngs: nnx.Rngs):
        self.config = config
        ops = kernels.resolve(config.kernels)

        def embed(d_model: int) -> layers.Embed:
            """Init std d_model**-0.5: unit-scale inputs after the sqrt(d_model) factor, unit-scale tied logits."""
            return layers.Embed(
                config.vocab_size, d_model, kernels=ops, stddev=d_model**-0.5, dtype=config.dtype, rngs=rngs
            )

        self.encoder_embedder = embed(config.encoder_d_model)
        self.decoder_embedder = embed(config.decoder_d_model)
        self.encoder = Stack(config, "encoder", lambda rngs: EncoderLayer(config, rngs=rngs), rngs=rngs)
        self.decoder = Stack(config, "decoder", lambda rngs: DecoderLayer(config, rngs=rngs), rngs=rngs)
        self.logits_dense = None if config.tie_word_embeddings else layers.Dense(
            (config.decoder_d_model,), (config.vocab_size,), ("embed", "vocab"),
            init=layers.variance_scaling("truncated_normal"), kernels=ops, dtype=config.dtype, rngs=rngs,
        )

    def _encoder_stack(
        self, tokens: jax.Array, positions: jax.Array, mask: jax.Array, dropout_rngs: nnx.Rngs | None
    ) -> jax.Array:
        return self.encoder(self.encoder_embedder(tokens), (positions, mask), dropout_rngs)

    def encoder_hidden_states(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> list[jax.Array]:
        """[embedding output, layer 1, ..., layer n] of the encoder, the last normed as `encode` returns it."""
        mask = layers.encoder_mask(tokens, segment_ids)
        positions = jnp.arange(tokens.shape[1])[None] if positions is None else positions
        return self.encoder.hidden_states(self.encoder_embedder(tokens), (positions, mask))

    def _decoder_stack(
        self, tokens: jax.Array, positions: jax.Array, encoded: jax.Array, self_mask: jax.Array,
        cross_mask: jax.Array, dropout_rngs: nnx.Rngs | None,
    ) -> jax.Array:
        args = (positions, encoded, self_mask, cross_mask)
        return self.decoder(self.decoder_embedder(tokens), args, dropout_rngs)

    def _logits(self, y: jax.Array) -> jax.Array:
        """Decoder output [b, t, e] -> float32 logits [b, t, vocab], soft-capped."""
        if self.logits_dense is None:
            logits = self.decoder_embedder.attend(y)
        else:
            logits = partitioning.constrain(self.logits_dense(y, out_dtype=jnp.float32), "logits", layers.VOCAB_AXES)
        return layers.soft_cap(logits, self.config.final_logit_softcapping)

    def init_decode_state(self, encoded: jax.Array, encoder_mask: jax.Array, max_decode_length: int) -> DecodeState:
        """Empty self-attention caches for `max_decode_length` positions plus every decoder layer's
        cross-attention keys and values of `encoded` [b, s, e]; `encoder_mask` [b, s] marks real tokens."""
        config, batch = self.config, encoded.shape[0]
        _, cross = stacks.each_layer(
            self.decoder.layers, lambda layer, carry, i: (carry, layer.cross_attention.project_kv(encoded)), None,
            scan=config.scan_layers,
        )
        cache = self._empty_self_cache(batch, max_decode_length)
        return DecodeState(
            cache=cache, cross=cross, cross_mask=encoder_mask, first_slot=jnp.zeros((batch,), jnp.int32),
            forced_token=jnp.full((batch,), -1, jnp.int32), index=jnp.zeros((), jnp.int32),
        )

    def _empty_self_cache(self, batch: int, length: int) -> StackCache | WindowedCache:
        """Zeroed self-attention caches for `length` decode positions: a `WindowedCache` with a sliding
        window, one cache of every layer without."""
        config = self.config

        def empty(num_layers: int, slots: int) -> StackCache:
            return attention.empty_stack_cache(
                batch, num_layers, config.decoder_num_kv_heads, slots, config.decoder_head_dim,
                jnp.dtype(config.dtype), scan=config.scan_layers,
            )

        layer_count = config.decoder_num_layers
        if config.sliding_window is None:
            return empty(layer_count, length)
        return WindowedCache(empty((layer_count + 1) // 2, min(config.sliding_window, length)),
                             empty(layer_count // 2, length))

    def decode_step(self, state: DecodeState, token_ids: jax.Array) -> tuple[jax.Array, DecodeState]:
        """Feeds one decoder token per row ([b] ids for position `state.index`; position 0 takes the
        decoder start id) and returns float32 next-token logits [b, vocab] and the advanced state."""
        decoder = self.decoder
        y = decoder.scale(self.decoder_embedder(token_ids[:, None]))
        if isinstance(state.cache, WindowedCache):
            y, cache = self._decode_windowed(y, state)
        else:
            y, cache = self._decode_all_global(y, state)
        return self._logits(decoder.final_norm(y))[:, 0], state.advanced(cache)

    def _decode_all_global(self, y: jax.Array, state: DecodeState) -> tuple[jax.Array, StackCache]:
        """The decoder layers over one cache of every layer (no sliding window)."""

        def step(layer: DecoderLayer, carry, i):
            y, cache = carry
            return layer.decode_step(y, state, i, cache, i, layers.FULL_WINDOW), None

        decoder = self.decoder
        (y, cache), _ = stacks.each_layer(decoder.layers, step, (y, state.cache), scan=decoder.scan_layers)
        return y, cache

    def _decode_windowed(self, y: jax.Array, state: DecodeState) -> tuple[jax.Array, WindowedCache]:
        """The decoder layers over a `WindowedCache`: layer i is local (even i) or global, with its cache
        at i // 2 of that kind. Scanned, one `lax.scan` steps over (local, global) pairs."""
        window = self.config.sliding_window

        def local(layer: DecoderLayer, y: jax.Array, cache: WindowedCache, j):
            y, part = layer.decode_step(y, state, 2 * j, cache.local, j, window)
            return y, cache._replace(local=part)

        def full(layer: DecoderLayer, y: jax.Array, cache: WindowedCache, j):
            y, part = layer.decode_step(y, state, 2 * j + 1, cache.full, j, layers.FULL_WINDOW)
            return y, cache._replace(full=part)

        cache, count = state.cache, self.config.decoder_num_layers
        if not self.decoder.scan_layers:
            for i, layer in enumerate(self.decoder.layers):
                y, cache = (local if i % 2 == 0 else full)(layer, y, cache, i // 2)
            return y, cache
        layer_at = _scanned_layer(self.decoder.layers)

        def pair(carry, j):
            y, cache = local(layer_at(2 * j), *carry, j)
            return full(layer_at(2 * j + 1), y, cache, j), None

        (y, cache), _ = jax.lax.scan(pair, (y, cache), jnp.arange(count // 2))
        if count % 2:
            y, cache = local(layer_at(count - 1), y, cache, count // 2)
        return y, cache


def _scanned_layer(stacked: nnx.Module):
    """i -> layer i of scanned (stacked) layers, as a module over that layer's slice of the params
    (`i` may be traced: a dynamic index, as `lax.scan` itself takes)."""
    graphdef, params = nnx.split(stacked)

    def layer_at(i: int | jax.Array) -> nnx.Module:
        take = functools.partial(jax.lax.dynamic_index_in_dim, index=i, axis=0, keepdims=False)
        return nnx.merge(graphdef, jax.tree.map(take, params))

    return layer_at
