"""T5 through `jax.nn.dot_product_attention` (the code path cuDNN takes on GPU; its XLA form runs on CPU)
gives the einsum attention's logits and gradients, masks and relative biases included."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite.models import layers
from t5x_lite.models.encoder_decoder import T5, T5Config

CONFIG = T5Config(
    vocab_size=64, d_model=32, num_heads=2, head_dim=8, d_ff=48, num_encoder_layers=1, num_decoder_layers=1
)


def packed_batch():
    """Two packed rows with padding, so segment, causal and padding masks all matter."""
    rng = np.random.default_rng(0)
    enc_seg = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2]], np.int32)
    dec_seg = np.array([[1, 1, 2, 2, 0], [1, 1, 1, 2, 2]], np.int32)
    enc = np.where(enc_seg > 0, rng.integers(2, 64, enc_seg.shape), 0).astype(np.int32)
    dec = np.where(dec_seg > 0, rng.integers(2, 64, dec_seg.shape), 0).astype(np.int32)
    return enc, dec, enc_seg, dec_seg


def loss_and_grads(impl: str, dtype: str = "float32"):
    """Logits of the packed batch and the gradients of a loss on them (jitted, no dropout)."""
    config = dataclasses.replace(CONFIG, attention_impl=impl, dtype=dtype)
    graphdef, params = nnx.split(T5(config, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(*packed_batch())
        return jnp.mean(jnp.square(logits)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def dropout_logits(impl: str):
    config = dataclasses.replace(CONFIG, attention_impl=impl, dropout_rate=0.1)
    graphdef, params = nnx.split(T5(config, rngs=nnx.Rngs(0)))
    return jax.jit(lambda p: nnx.merge(graphdef, p)(*packed_batch(), dropout_rngs=nnx.Rngs(dropout=1)))(params)


def test_dot_product_attention_matches_einsum():
    logits, grads = loss_and_grads("einsum")
    xla_logits, xla_grads = loss_and_grads("xla")
    np.testing.assert_allclose(xla_logits, logits, atol=1e-5, rtol=1e-5)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    xla_leaves = jax.tree_util.tree_leaves_with_path(xla_grads)
    assert [p for p, _ in xla_leaves] == [p for p, _ in leaves]
    for (path, g), (_, xla_g) in zip(leaves, xla_leaves, strict=True):
        np.testing.assert_allclose(xla_g, g, atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_bf16_dot_product_attention_runs_forward_and_backward():
    logits, _ = loss_and_grads("einsum", "bfloat16")
    xla_logits, xla_grads = loss_and_grads("xla", "bfloat16")
    assert np.isfinite(xla_logits).all() and all(np.isfinite(g).all() for g in jax.tree.leaves(xla_grads))
    np.testing.assert_allclose(xla_logits, logits, atol=0.1, rtol=0.05)


def test_attention_dropout_falls_back_to_einsum():
    """Fused kernels have no attention dropout: with dropout on, both implementations run the same einsum."""
    np.testing.assert_array_equal(dropout_logits("xla"), dropout_logits("einsum"))


def test_auto_is_einsum_off_gpu_and_names_are_checked():
    expected = "cudnn" if jax.default_backend() == "gpu" else "einsum"
    assert layers.attention_impl("auto", jnp.bfloat16, 64) == expected
    assert layers.attention_impl("auto", jnp.float32, 64) == "einsum"
    assert layers.attention_impl("auto", jnp.bfloat16, 256) == "einsum"
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        dataclasses.replace(CONFIG, attention_impl="flash")
