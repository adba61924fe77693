"""T5 through `jax.nn.dot_product_attention` (the code path cuDNN takes on GPU; its XLA form runs on CPU)
gives the einsum attention's logits and gradients, masks and relative biases included."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite.networks.t5 import T5, T5Config
from t5x_lite.nn import attention

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


def loss_and_grads(impl: str, dtype: str = "float32", packed: bool = True):
    """Logits of the packed batch (or its unpacked tokens) and the gradients of a loss on them (jitted, no
    dropout)."""
    config = dataclasses.replace(CONFIG, attention_impl=impl, dtype=dtype)
    graphdef, params = nnx.split(T5(config, rngs=nnx.Rngs(0)), nnx.Param)
    batch = packed_batch() if packed else packed_batch()[:2]

    def loss(params):
        logits = nnx.merge(graphdef, params)(*batch)
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


def test_fused_attention_gets_a_bias_over_all_query_and_key_positions(monkeypatch):
    """cuDNN rejects a bias that broadcasts over query or key positions ("Bias must have same seq length as
    QKV"), e.g. a cross-attention padding mask [b, 1, 1, k]; every call must pass [.., q, k]."""
    fused = jax.nn.dot_product_attention
    seen = []

    def checking(query, key, value, *, bias, implementation, **kwargs):
        seen.append((implementation, bias.shape, query.shape[1], key.shape[1]))
        return fused(query, key, value, bias=bias, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", checking)
    for packed in (False, True):
        logits, _ = loss_and_grads("cudnn", "bfloat16", packed)
        assert np.isfinite(logits).all()
    assert len(seen) == 6  # encoder self-, decoder self- and cross-attention, unpacked and packed
    for implementation, bias_shape, q_len, k_len in seen:
        assert implementation == "cudnn" and len(bias_shape) == 4 and bias_shape[-2:] == (q_len, k_len)


def test_auto_on_gpu_runs_einsum_for_odd_lengths(monkeypatch):
    """cuDNN's biased attention needs even sequence lengths: "auto" keeps the fused kernel for the 8 x 8
    encoder self-attention and runs einsum for the decoder's 5-long queries (self- and cross-attention)."""
    with monkeypatch.context() as gpu:
        gpu.setattr(jax, "default_backend", lambda: "gpu")
        model = T5(dataclasses.replace(CONFIG, dtype="bfloat16"), rngs=nnx.Rngs(0))
    fused = jax.nn.dot_product_attention
    lengths = []

    def checking(query, key, value, *, implementation, **kwargs):
        lengths.append((implementation, query.shape[1], key.shape[1]))
        return fused(query, key, value, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", checking)
    enc, dec, _, _ = packed_batch()
    assert np.isfinite(model(enc, dec)).all()
    assert lengths == [("cudnn", 8, 8)]


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
    assert attention.attention_impl("auto", jnp.bfloat16, 64) == expected
    assert attention.attention_impl("auto", jnp.float32, 64) == "einsum"
    assert attention.attention_impl("auto", jnp.bfloat16, 256) == "einsum"
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        dataclasses.replace(CONFIG, attention_impl="flash")
