"""Tests for t5x_lite.nn.layers and nn.attention: buckets, norms, init scales, bf16 matmuls, masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite.nn import attention, kernels, layers

OPS = kernels.resolve("auto")

DISTANCES = [0, 1, -1, 7, -7, 8, -8, 15, 16, -16, 40, -40, 127, -127, 128, -128, 500, -500]
# Hand-computed from the T5 formula (relative_position = key - query), 32 buckets, max distance 128.
# Bidirectional: 16 buckets per side (key after query -> +16), 8 exact, then
# 8 + floor(ln(n / 8) / ln(128 / 8) * 8), capped at 15. E.g. n=40: 8 + floor(4.64) = 12.
BIDIRECTIONAL = [0, 17, 1, 23, 7, 24, 8, 25, 26, 10, 28, 12, 31, 15, 31, 15, 31, 15]
# Causal: future keys -> 0; n = query - key; 16 exact, then 16 + floor(ln(n / 16) / ln(8) * 16), capped at 31.
CAUSAL = [0, 0, 1, 0, 7, 0, 8, 0, 0, 16, 0, 23, 0, 31, 0, 31, 0, 31]


def test_relative_position_bucket_matches_t5_formula():
    d = np.array(DISTANCES)
    np.testing.assert_array_equal(layers.relative_position_bucket(d, bidirectional=True), BIDIRECTIONAL)
    np.testing.assert_array_equal(layers.relative_position_bucket(d, bidirectional=False), CAUSAL)


def test_relative_position_bias_shape_and_lookup():
    bias = layers.RelativePositionBias(3, bidirectional=False, rngs=nnx.Rngs(0))
    out = bias(jnp.arange(5), jnp.arange(7))
    assert out.shape == (1, 3, 5, 7) and out.dtype == jnp.float32
    table = bias.rel_embedding[...]
    np.testing.assert_array_equal(out[0, :, 4, 1], table[:, 3])  # 3 tokens back: causal bucket 3
    np.testing.assert_array_equal(out[0, :, 1, 6], table[:, 0])  # future key: bucket 0
    assert bias.rel_embedding.logical_axes == ("heads", "relpos_buckets")


def test_rms_norm_float32_math():
    norm = layers.RMSNorm(4, dtype=jnp.bfloat16)
    norm.scale[...] = jnp.array([1.0, 2.0, 0.5, 1.0])
    x = jnp.array([[1.0, -2.0, 3.0, 4.0]], jnp.bfloat16)
    expected = np.array([1.0, -2.0, 3.0, 4.0]) / np.sqrt(30 / 4 + 1e-6) * np.array([1.0, 2.0, 0.5, 1.0])
    out = norm(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32)[0], expected, rtol=1e-2)


def test_init_scales():
    rngs = nnx.Rngs(0)
    d_model, heads, head_dim, d_ff = 256, 8, 32, 512
    attn = attention.MultiHeadAttention(d_model, heads, head_dim, kernels=OPS, rngs=rngs)
    mlp = layers.MlpBlock(d_model, d_ff, kernels=OPS, rngs=rngs)
    embed = layers.Embed(1000, d_model, kernels=OPS, rngs=rngs)
    std = lambda p: float(jnp.std(p[...]))
    assert std(attn.query.kernel) == pytest.approx(1 / math.sqrt(d_model * head_dim), rel=0.05)
    assert std(attn.key.kernel) == pytest.approx(1 / math.sqrt(d_model), rel=0.05)
    assert std(attn.out.kernel) == pytest.approx(1 / math.sqrt(heads * head_dim), rel=0.05)
    assert std(mlp.wi_0.kernel) == pytest.approx(1 / math.sqrt(d_model), rel=0.05)
    assert std(mlp.wo.kernel) == pytest.approx(1 / math.sqrt(d_ff), rel=0.05)
    assert std(embed.embedding) == pytest.approx(1.0, rel=0.05)
    assert attn.query.kernel.logical_axes == ("embed", "heads", "kv")
    assert attn.out.kernel.logical_axes == ("heads", "kv", "embed")
    assert mlp.wo.kernel.logical_axes == ("mlp", "embed")


def test_mlp_block_variants():
    relu = layers.MlpBlock(8, 16, kernels=OPS, activation="relu", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    expected = jax.nn.relu(x @ relu.wi.kernel[...]) @ relu.wo.kernel[...]
    np.testing.assert_allclose(relu(x), expected, rtol=1e-5, atol=1e-6)
    silu = layers.MlpBlock(8, 16, kernels=OPS, activation="gated-silu", rngs=nnx.Rngs(0))  # UL2
    expected = (jax.nn.silu(x @ silu.wi_0.kernel[...]) * (x @ silu.wi_1.kernel[...])) @ silu.wo.kernel[...]
    np.testing.assert_allclose(silu(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gated-gelu"):
        layers.MlpBlock(8, 16, kernels=OPS, activation="swish", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kernel_set", kernels.KERNEL_CHOICES[1:])
@pytest.mark.parametrize("block", ["attention", "mlp"])
def test_bf16_grads_execute_and_match_float32(block, kernel_set):
    """bf16 matmuls run forward and backward (some CPU bf16 dot layouts fail only at run time)."""
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    kv = jax.random.normal(jax.random.key(2), (2, 8, 32))
    bias = layers.mask_to_bias(layers.padding_mask(jnp.array([[1] * 8, [1] * 5 + [0] * 3])))
    grads, ops = {}, kernels.resolve(kernel_set)
    for dtype in (jnp.float32, jnp.bfloat16):
        if block == "attention":
            graphdef, state = nnx.split(attention.MultiHeadAttention(32, 2, 8, kernels=ops, dtype=dtype, rngs=nnx.Rngs(0)))
        else:
            graphdef, state = nnx.split(layers.MlpBlock(32, 48, kernels=ops, dtype=dtype, rngs=nnx.Rngs(0)))

        def loss(state, x, kv, graphdef=graphdef):
            module = nnx.merge(graphdef, state)
            out = module(x, kv, bias) if block == "attention" else module(x)
            return jnp.sum(jnp.sin(out.astype(jnp.float32)))

        grads[dtype] = jax.tree.leaves(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(state, x, kv))
    for g16, g32 in zip(grads[jnp.bfloat16], grads[jnp.float32]):
        assert g16.dtype == jnp.float32
        assert float(jnp.linalg.norm(g16 - g32)) <= 0.05 * float(jnp.linalg.norm(g32)) + 1e-6


def test_masks():
    tokens = jnp.array([[5, 6, 0]])
    segments = jnp.array([[1, 1, 2, 0]])
    np.testing.assert_array_equal(layers.padding_mask(tokens)[0, 0, 0], [True, True, False])
    np.testing.assert_array_equal(
        layers.segment_mask(segments, segments)[0, 0],
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
    )
    np.testing.assert_array_equal(layers.causal_mask(3)[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    bias = layers.mask_to_bias(layers.padding_mask(tokens))
    assert bias.dtype == jnp.float32 and float(bias[0, 0, 0, 2]) <= -1e9 and float(bias[0, 0, 0, 0]) == 0.0


def test_attention_ignores_masked_keys():
    attn = attention.MultiHeadAttention(8, 2, 4, kernels=OPS, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 4, 8))
    bias = layers.mask_to_bias(layers.padding_mask(jnp.array([[1, 1, 1, 0]])))
    changed = x.at[0, 3].set(100.0)
    np.testing.assert_allclose(attn(x, x, bias), attn(x, changed, bias), rtol=1e-6, atol=1e-6)


