"""Tests for the T5 encoder-decoder network: shapes, bf16, causality, packing, axes, size, dropout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite.networks.t5 import T5, T5Config
from t5x_lite.nn.layers import param_count

TINY = T5Config(
    vocab_size=64, d_model=32, num_heads=2, head_dim=8, d_ff=48, num_encoder_layers=2, num_decoder_layers=2
)
LOGICAL_AXES = {"vocab", "embed", "mlp", "heads", "kv", "relpos_buckets"}


def jitted(model: T5, method: str = "__call__"):
    """Pure jitted `model.method` over the model's state, as a train/eval step would call it."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, *args, key=None):
        rngs = None if key is None else nnx.Rngs(dropout=key)
        return getattr(nnx.merge(graphdef, state), method)(*args, dropout_rngs=rngs)

    return lambda *args, **kwargs: apply(state, *args, **kwargs)


def tokens(key, shape, vocab=TINY.vocab_size):
    return jax.random.randint(jax.random.key(key), shape, 1, vocab)


@pytest.fixture(scope="module")
def tiny_model():
    return T5(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(tiny_model):
    return jitted(tiny_model)


@pytest.fixture(scope="module")
def encode(tiny_model):
    return jitted(tiny_model, "encode")


def test_shapes_and_dtype(forward, encode):
    enc, dec = tokens(1, (2, 8)), tokens(2, (2, 6))
    assert encode(enc).shape == (2, 8, TINY.d_model)
    logits = forward(enc, dec)
    assert logits.shape == (2, 6, TINY.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_bfloat16_forward_and_grad_execute(forward):
    config = dataclasses.replace(TINY, dtype="bfloat16", dropout_rate=0.1)
    model = T5(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    enc, dec = tokens(1, (2, 8)), tokens(2, (2, 6))

    def loss(state, key):
        logits = nnx.merge(graphdef, state)(enc, dec, dropout_rngs=nnx.Rngs(dropout=key))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), dec[..., None], -1))

    value, grads = jax.jit(jax.value_and_grad(loss))(state, jax.random.key(0))
    assert np.isfinite(float(value))
    for g in jax.tree.leaves(grads):
        assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(grads["encoder"]["layers"][0]["attention"]["key"]["kernel"][...]).max()) > 0

    bf16_logits = jitted(model)(enc, dec)  # same params as the float32 model: close logits
    f32_logits = forward(enc, dec)
    assert bf16_logits.dtype == jnp.float32
    np.testing.assert_allclose(bf16_logits, f32_logits, atol=0.1 * float(jnp.abs(f32_logits).max()))


def test_decoder_is_causal(forward):
    enc, dec = tokens(1, (2, 8)), tokens(2, (2, 6))
    changed = dec.at[:, 3:].set(tokens(3, (2, 3)))
    np.testing.assert_allclose(forward(enc, dec)[:, :3], forward(enc, changed)[:, :3], atol=1e-6)
    assert not np.allclose(forward(enc, dec)[:, 3:], forward(enc, changed)[:, 3:])


def test_encoder_padding_is_ignored(forward):
    enc, dec = tokens(1, (2, 8)).at[0, 6:].set(0), tokens(2, (2, 6))
    padded = jnp.pad(enc, ((0, 0), (0, 5)))
    np.testing.assert_allclose(forward(enc, dec), forward(padded, dec), atol=1e-5)


def test_packed_segments_do_not_interact(forward, encode):
    enc_a, enc_b, dec_a, dec_b = tokens(1, (5,)), tokens(2, (6,)), tokens(3, (4,)), tokens(4, (3,))
    dec_a, dec_b = dec_a.at[0].set(0), dec_b.at[0].set(0)  # each target starts with BOS = 0

    def row(parts, length):
        return jnp.concatenate([*parts, jnp.zeros(length - sum(len(p) for p in parts), jnp.int32)])[None]

    enc, dec = row([enc_a, enc_b], 12), row([dec_a, dec_b], 8)
    enc_seg = row([jnp.full(5, 1), jnp.full(6, 2)], 12)
    dec_seg = row([jnp.full(4, 1), jnp.full(3, 2)], 8)
    packed = forward(enc, dec, enc_seg, dec_seg)
    alone_a = forward(row([enc_a], 12), row([dec_a], 8))
    alone_b = forward(row([enc_b], 12), row([dec_b], 8))
    np.testing.assert_allclose(packed[0, :4], alone_a[0, :4], atol=1e-5)
    np.testing.assert_allclose(packed[0, 4:7], alone_b[0, :3], atol=1e-5)

    changed = forward(enc.at[0, 5:11].set(tokens(5, (6,))), dec.at[0, 5:7].set(tokens(6, (2,))), enc_seg, dec_seg)
    np.testing.assert_allclose(changed[0, :4], packed[0, :4], atol=1e-6)
    assert not np.allclose(changed[0, 4:7], packed[0, 4:7])

    encoded = encode(enc, enc_seg)
    np.testing.assert_allclose(encoded[0, :5], encode(row([enc_a], 12))[0, :5], atol=1e-5)
    np.testing.assert_allclose(encoded[0, 5:11], encode(row([enc_b], 12))[0, :6], atol=1e-5)


def test_every_param_has_logical_axes():
    for config in (TINY, dataclasses.replace(TINY, feed_forward="relu", tie_word_embeddings=True)):
        model = nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0)))  # noqa: B023
        params = nnx.to_flat_state(nnx.state(model, nnx.Param))
        assert params
        for path, param in params:
            axes = param.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == param.ndim, path
            assert set(axes) <= LOGICAL_AXES, (path, axes)
            assert param.dtype == jnp.float32, path


def expected_param_count(c: T5Config) -> int:
    attention = 4 * c.d_model * c.num_heads * c.head_dim
    mlp = (3 if c.feed_forward == "gated-gelu" else 2) * c.d_model * c.d_ff
    relpos = c.num_heads * c.relative_attention_num_buckets
    encoder = c.num_encoder_layers * (attention + mlp + 2 * c.d_model) + relpos + c.d_model
    decoder = c.num_decoder_layers * (2 * attention + mlp + 3 * c.d_model) + relpos + c.d_model
    embeddings = (1 if c.tie_word_embeddings else 2) * c.vocab_size * c.d_model
    return embeddings + encoder + decoder


def test_param_count_t5_v1_1_small():
    config = T5Config()  # T5 v1.1 small
    model = nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0)))
    assert param_count(model) == expected_param_count(config) == 76_961_152  # HF google/t5-v1_1-small
    tied = dataclasses.replace(config, feed_forward="relu", tie_word_embeddings=True)
    assert param_count(nnx.eval_shape(lambda: T5(tied, rngs=nnx.Rngs(0)))) == expected_param_count(tied)


def test_relative_bias_per_layer_gives_every_layer_its_own_table():
    """umT5: a table in each layer (2 + 2 here) instead of one per stack (2)."""
    per_layer = dataclasses.replace(TINY, relative_bias_per_layer=True)
    model = nnx.eval_shape(lambda: T5(per_layer, rngs=nnx.Rngs(0)))
    relpos = TINY.num_heads * TINY.relative_attention_num_buckets
    assert param_count(model) == expected_param_count(TINY) + 2 * relpos
    assert model.encoder.relpos_bias is None and model.decoder.relpos_bias is None
    assert model.decoder.layers[1].relpos_bias.rel_embedding.shape == (TINY.num_heads, TINY.relative_attention_num_buckets)


def test_dropout_only_with_rngs(forward):
    with_dropout = jitted(T5(dataclasses.replace(TINY, dropout_rate=0.1), rngs=nnx.Rngs(0)))
    enc, dec = tokens(1, (2, 8)), tokens(2, (2, 6))
    eval_logits = with_dropout(enc, dec)
    np.testing.assert_array_equal(eval_logits, with_dropout(enc, dec))
    np.testing.assert_allclose(eval_logits, forward(enc, dec), atol=1e-6)  # no rngs: same as rate 0
    a, b = with_dropout(enc, dec, key=jax.random.key(0)), with_dropout(enc, dec, key=jax.random.key(1))
    assert not np.allclose(a, b) and not np.allclose(a, eval_logits)
    np.testing.assert_array_equal(a, with_dropout(enc, dec, key=jax.random.key(0)))


def test_config_and_segment_errors(forward):
    with pytest.raises(ValueError, match="feed_forward"):
        T5Config(feed_forward="gated-swish")
    with pytest.raises(ValueError, match="dtype"):
        T5Config(dtype="float33")
    with pytest.raises(ValueError, match="segment_ids"):
        forward(tokens(1, (1, 4)), tokens(2, (1, 3)), jnp.ones((1, 4), jnp.int32))
