"""Tests for t5x_lite.models.layers: buckets, norms, init scales, bf16 matmuls, dropout, masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite.models import layers

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
    attn = layers.MultiHeadAttention(d_model, heads, head_dim, rngs=rngs)
    mlp = layers.MlpBlock(d_model, d_ff, rngs=rngs)
    embed = layers.Embed(1000, d_model, rngs=rngs)
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
    relu = layers.MlpBlock(8, 16, activation="relu", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    expected = jax.nn.relu(x @ relu.wi.kernel[...]) @ relu.wo.kernel[...]
    np.testing.assert_allclose(relu(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gated-gelu"):
        layers.MlpBlock(8, 16, activation="swish", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("block", ["attention", "mlp"])
def test_bf16_grads_execute_and_match_float32(block):
    """bf16 matmuls run forward and backward (some CPU bf16 dot layouts fail only at run time)."""
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    kv = jax.random.normal(jax.random.key(2), (2, 8, 32))
    bias = layers.mask_to_bias(layers.padding_mask(jnp.array([[1] * 8, [1] * 5 + [0] * 3])))
    grads = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        if block == "attention":
            graphdef, state = nnx.split(layers.MultiHeadAttention(32, 2, 8, dtype=dtype, rngs=nnx.Rngs(0)))
        else:
            graphdef, state = nnx.split(layers.MlpBlock(32, 48, dtype=dtype, rngs=nnx.Rngs(0)))

        def loss(state, x, kv, graphdef=graphdef):
            module = nnx.merge(graphdef, state)
            out = module(x, kv, bias) if block == "attention" else module(x)
            return jnp.sum(jnp.sin(out.astype(jnp.float32)))

        grads[dtype] = jax.tree.leaves(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(state, x, kv))
    for g16, g32 in zip(grads[jnp.bfloat16], grads[jnp.float32]):
        assert g16.dtype == jnp.float32
        assert float(jnp.linalg.norm(g16 - g32)) <= 0.05 * float(jnp.linalg.norm(g32)) + 1e-6


@pytest.mark.parametrize(
    "spec", ["bte,ehd->bthd", "bthd,hde->bte", "bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", "bte,ve->btv"]
)
def test_float32_einsum_vjp_equals_autodiff(spec):
    """The hand-written backward of `layers.einsum` gives autodiff's float32 gradients."""
    sizes = {"b": 2, "t": 5, "e": 6, "h": 3, "d": 4, "q": 5, "k": 7, "v": 9}
    x_spec, y_spec = spec.split("->")[0].split(",")
    x = jax.random.normal(jax.random.key(0), [sizes[c] for c in x_spec])
    y = jax.random.normal(jax.random.key(1), [sizes[c] for c in y_spec])

    def loss(fn):
        return lambda x, y: jnp.sum(jnp.sin(fn(x, y)))

    ours = jax.grad(loss(lambda x, y: layers.einsum(spec, x, y, dtype=jnp.float32)), argnums=(0, 1))(x, y)
    reference = jax.grad(loss(lambda x, y: jnp.einsum(spec, x, y)), argnums=(0, 1))(x, y)
    for got, want in zip(ours, reference):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_softmax_vjp_equals_autodiff():
    """`layers.softmax` (backward from the saved probabilities) matches autodiff of jax.nn.softmax, masked keys too."""
    logits = 4.0 * jax.random.normal(jax.random.key(0), (2, 3, 5, 7))
    logits = logits.at[..., -2:].add(layers.NEG_INF)  # padded keys, as the attention bias makes them
    cotangent = jax.random.normal(jax.random.key(1), logits.shape)

    def vjp(fn):
        probs, pullback = jax.vjp(fn, logits)
        return probs, pullback(cotangent)[0]

    probs, grad = vjp(layers.softmax)
    want_probs, want_grad = vjp(lambda x: jax.nn.softmax(x, axis=-1))
    np.testing.assert_allclose(probs, want_probs, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    assert not np.any(grad[..., -2:])


@pytest.mark.parametrize(
    "x_shape, y_shape",
    [((1, 6, 8, 8), (8, 1, 8, 8)), ((1, 5, 3, 3), (7, 1, 3, 3)), ((3,), (4, 2, 3)), ((4, 1, 3), (1, 5, 3))],
)
def test_broadcast_add_gradient_sums_broadcast_axes(x_shape, y_shape):
    """`layers.broadcast_add`'s backward (sums over broadcast axes as products with ones) equals autodiff's,
    for missing leading axes too."""
    x, y = (jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate((x_shape, y_shape)))
    weights = jax.random.normal(jax.random.key(2), jnp.broadcast_shapes(x_shape, y_shape))

    def grads(add):
        return jax.jit(jax.grad(lambda x, y: jnp.sum(add(x, y) * weights), argnums=(0, 1)))(x, y)

    np.testing.assert_array_equal(layers.broadcast_add(x, y), x + y)
    for got, want in zip(grads(layers.broadcast_add), grads(jnp.add), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dropout_statistics_and_determinism():
    x = jnp.ones((64, 1000))
    assert layers.dropout(x, 0.1, None) is x
    assert layers.dropout(x, 0.0, nnx.Rngs(dropout=0)) is x
    a = layers.dropout(x, 0.1, nnx.Rngs(dropout=0))
    b = layers.dropout(x, 0.1, nnx.Rngs(dropout=1))
    kept_a, kept_b = np.asarray(a) > 0, np.asarray(b) > 0
    assert kept_a.mean() == pytest.approx(0.9, abs=0.005)
    assert float(a.mean()) == pytest.approx(1.0, abs=0.01)  # inverted scaling keeps the expectation
    assert (kept_a == kept_b).mean() == pytest.approx(0.9**2 + 0.1**2, abs=0.01)  # independent masks
    np.testing.assert_array_equal(a, layers.dropout(x, 0.1, nnx.Rngs(dropout=0)))
    rngs = nnx.Rngs(dropout=0)
    assert not np.array_equal(layers.dropout(x, 0.1, rngs), layers.dropout(x, 0.1, rngs))  # fresh key per call
    with pytest.raises(ValueError, match="dropout rate"):
        layers.dropout(x, 1.0, rngs)


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
    attn = layers.MultiHeadAttention(8, 2, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 4, 8))
    bias = layers.mask_to_bias(layers.padding_mask(jnp.array([[1, 1, 1, 0]])))
    changed = x.at[0, 3].set(100.0)
    np.testing.assert_allclose(attn(x, x, bias), attn(x, changed, bias), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "choice, cpu_bf16_dot, expected",
    [("auto", False, jnp.float32), ("auto", True, jnp.bfloat16), ("auto", None, jnp.bfloat16),
     ("bfloat16", False, jnp.bfloat16), ("float32", True, jnp.float32)],
)
def test_bf16_dot_operands_follow_the_cpu(monkeypatch, choice, cpu_bf16_dot, expected):
    """bf16 matmuls enter the dot as float32 only on a CPU known to lack bf16 dot instructions, or when asked."""
    monkeypatch.setenv(layers.BF16_DOTS_ENV, choice)
    monkeypatch.setattr(layers.cpu_features, "has_bf16_dot", lambda: cpu_bf16_dot)
    assert layers.dot_operand_dtype(jnp.bfloat16) == expected
    assert layers.dot_operand_dtype(jnp.float32) == jnp.float32


def test_unknown_bf16_dot_choice_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(layers.BF16_DOTS_ENV, "fp8")
    with pytest.raises(ValueError, match="T5X_LITE_BF16_DOTS='fp8': use auto, bfloat16 or float32"):
        layers.dot_operand_dtype(jnp.bfloat16)


def test_float32_dots_of_bf16_matmuls_give_the_bf16_dots_results(monkeypatch):
    """Upcasting bf16 operands is exact, so an attention block's loss and gradients barely move (float32
    accumulation either way), and every dot of the backward pass takes the chosen operands too."""
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    kv = jax.random.normal(jax.random.key(2), (2, 8, 32))
    bias = layers.mask_to_bias(layers.padding_mask(jnp.array([[1] * 8, [1] * 5 + [0] * 3])))
    graphdef, state = nnx.split(layers.MultiHeadAttention(32, 2, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))

    def loss(state, x, kv):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x, kv, bias).astype(jnp.float32)))

    def dot_operand_dtypes(jaxpr) -> list[jnp.dtype]:
        found = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(jnp.result_type(*(v.aval.dtype for v in eqn.invars)))
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    found += dot_operand_dtypes(inner)
        return found

    results = {}
    for choice in ("bfloat16", "float32"):
        monkeypatch.setenv(layers.BF16_DOTS_ENV, choice)
        grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2))
        dtypes = dot_operand_dtypes(jax.make_jaxpr(grad_fn)(state, x, kv).jaxpr)
        # 6 forward dots (4 projections, 2 attention products), 12 backward ones, and the bias gradient's
        # two float32 sums with a vector of ones (`broadcast_add`).
        assert len(dtypes) == 6 + 12 + 2
        assert dtypes.count(jnp.dtype(jnp.bfloat16)) == (18 if choice == "bfloat16" else 0)
        results[choice] = jax.jit(grad_fn)(state, x, kv)
    (value16, grads16), (value32, grads32) = results["bfloat16"], results["float32"]
    assert float(value32) == pytest.approx(float(value16), rel=1e-2)
    for g16, g32 in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32)):
        assert float(jnp.linalg.norm(g32 - g16)) <= 1e-2 * float(jnp.linalg.norm(g16)) + 1e-6
