"""Tests for t5x_lite.nn.kernels: the KERNELS switch, and each set's matmul, softmax, bias add and dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals  # public only as a printer in jax 0.10

from t5x_lite.nn import attention, cpu_features, kernels, layers

XLA, TUNED = kernels.Kernels("xla"), kernels.Kernels("cpu_tuned")


def custom_vjp_calls(jaxpr) -> int:
    """How many custom-VJP calls a jaxpr makes, nested ones included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name.startswith("custom_vjp_call")
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                count += custom_vjp_calls(inner)
    return count


def test_auto_picks_cpu_tuned_on_the_cpu_backend_and_names_are_checked():
    assert jax.default_backend() == "cpu"
    assert kernels.resolve("auto").name == "cpu_tuned"
    assert kernels.resolve("xla") == kernels.Kernels("xla")
    with pytest.raises(ValueError, match=r"KERNELS.kernels='fast' is not supported.*--gin.KERNELS"):
        kernels.resolve("fast")


@pytest.mark.parametrize("ops", [XLA, TUNED], ids=["xla", "cpu_tuned"])
@pytest.mark.parametrize(
    "spec", ["bte,ehd->bthd", "bthd,hde->bte", "bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", "bte,ve->btv"]
)
def test_einsum_gradients_equal_autodiff(ops, spec):
    """Both sets' float32 matmuls give autodiff's gradients (cpu_tuned through its hand-written backward)."""
    sizes = {"b": 2, "t": 5, "e": 6, "h": 3, "d": 4, "q": 5, "k": 7, "v": 9}
    x_spec, y_spec = spec.split("->")[0].split(",")
    x = jax.random.normal(jax.random.key(0), [sizes[c] for c in x_spec])
    y = jax.random.normal(jax.random.key(1), [sizes[c] for c in y_spec])

    def loss(fn):
        return lambda x, y: jnp.sum(jnp.sin(fn(x, y)))

    ours = jax.grad(loss(lambda x, y: ops.einsum(spec, x, y, dtype=jnp.float32)), argnums=(0, 1))(x, y)
    reference = jax.grad(loss(lambda x, y: jnp.einsum(spec, x, y)), argnums=(0, 1))(x, y)
    for got, want in zip(ours, reference):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ops", [XLA, TUNED], ids=["xla", "cpu_tuned"])
def test_softmax_vjp_equals_autodiff(ops):
    """Both softmaxes (cpu_tuned's backward reads only the saved probabilities) match autodiff of
    jax.nn.softmax, masked keys too."""
    logits = 4.0 * jax.random.normal(jax.random.key(0), (2, 3, 5, 7))
    logits = logits.at[..., -2:].add(layers.NEG_INF)  # padded keys, as the attention bias makes them
    cotangent = jax.random.normal(jax.random.key(1), logits.shape)

    def vjp(fn):
        probs, pullback = jax.vjp(fn, logits)
        return probs, pullback(cotangent)[0]

    probs, grad = vjp(ops.softmax)
    want_probs, want_grad = vjp(lambda x: jax.nn.softmax(x, axis=-1))
    np.testing.assert_allclose(probs, want_probs, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    assert not np.any(grad[..., -2:])


@pytest.mark.parametrize("ops", [XLA, TUNED], ids=["xla", "cpu_tuned"])
@pytest.mark.parametrize(
    "x_shape, y_shape",
    [((1, 6, 8, 8), (8, 1, 8, 8)), ((1, 5, 3, 3), (7, 1, 3, 3)), ((3,), (4, 2, 3)), ((4, 1, 3), (1, 5, 3))],
)
def test_bias_add_gradient_sums_broadcast_axes(ops, x_shape, y_shape):
    """The bias add's backward (cpu_tuned: sums over broadcast axes as products with ones) equals
    autodiff's, for missing leading axes too."""
    x, y = (jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate((x_shape, y_shape)))
    weights = jax.random.normal(jax.random.key(2), jnp.broadcast_shapes(x_shape, y_shape))

    def grads(add):
        return jax.jit(jax.grad(lambda x, y: jnp.sum(add(x, y) * weights), argnums=(0, 1)))(x, y)

    np.testing.assert_array_equal(ops.add(x, y), x + y)
    for got, want in zip(grads(ops.add), grads(jnp.add), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ops", [XLA, TUNED], ids=["xla", "cpu_tuned"])
def test_dropout_statistics_and_determinism(ops):
    x = jnp.ones((64, 1000))
    assert ops.dropout(x, 0.1, None) is x
    assert ops.dropout(x, 0.0, nnx.Rngs(dropout=0)) is x
    a = ops.dropout(x, 0.1, nnx.Rngs(dropout=0))
    b = ops.dropout(x, 0.1, nnx.Rngs(dropout=1))
    kept_a, kept_b = np.asarray(a) > 0, np.asarray(b) > 0
    assert kept_a.mean() == pytest.approx(0.9, abs=0.005)
    assert float(a.mean()) == pytest.approx(1.0, abs=0.01)  # inverted scaling keeps the expectation
    assert (kept_a == kept_b).mean() == pytest.approx(0.9**2 + 0.1**2, abs=0.01)  # independent masks
    np.testing.assert_array_equal(a, ops.dropout(x, 0.1, nnx.Rngs(dropout=0)))
    rngs = nnx.Rngs(dropout=0)
    assert not np.array_equal(ops.dropout(x, 0.1, rngs), ops.dropout(x, 0.1, rngs))  # fresh key per call
    with pytest.raises(ValueError, match="dropout rate"):
        ops.dropout(x, 1.0, rngs)


def attention_grad_jaxpr(ops: kernels.Kernels, dtype=jnp.float32):
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    bias = layers.mask_to_bias(layers.padding_mask(jnp.array([[1] * 6, [1] * 4 + [0] * 2])))
    module = attention.MultiHeadAttention(32, 2, 8, kernels=ops, dropout_rate=0.1, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)

    def loss(state, x):
        out = nnx.merge(graphdef, state)(x, x, ops.add(bias, jnp.zeros((1, 2, 6, 6))), dropout_rngs=nnx.Rngs(dropout=0))
        return jnp.sum(jnp.sin(out.astype(jnp.float32)))

    return jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(state, x).jaxpr, (loss, state, x)


def test_xla_kernels_are_plain_jax_and_cpu_tuned_uses_its_custom_vjps():
    """KERNELS='xla' traces no custom VJP (JAX's own remat policies see every matmul); 'cpu_tuned' traces
    one per matmul, softmax and bias add. Both compute the same loss and gradients without dropout."""
    assert custom_vjp_calls(attention_grad_jaxpr(XLA)[0]) == 0
    assert custom_vjp_calls(attention_grad_jaxpr(TUNED)[0]) == 6 + 1 + 1
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable

    def kept(ops):
        _, (loss, state, x) = attention_grad_jaxpr(ops)
        return saved_residuals(jax.checkpoint(loss, policy=policy), state, x)

    # JAX's dot policy keeps the projections' outputs only when it can see the dots.
    assert len(kept(XLA)) > len(kept(TUNED))


@pytest.mark.parametrize(
    "choice, cpu_bf16_dot, expected",
    [("auto", False, "float32"), ("auto", True, "bfloat16"), ("auto", None, "bfloat16"),
     ("bfloat16", False, "bfloat16"), ("float32", True, "float32")],
)
def test_bf16_dot_operands_follow_the_cpu(monkeypatch, choice, cpu_bf16_dot, expected):
    """cpu_tuned feeds bf16 matmuls float32 operands only on a CPU known to lack bf16 dot instructions, or
    when asked; xla never does. The choice is made when the kernels are resolved, not while tracing."""
    monkeypatch.setenv(kernels.BF16_DOTS_ENV, choice)
    monkeypatch.setattr(cpu_features, "has_bf16_dot", lambda: cpu_bf16_dot)
    kernels.resolve.cache_clear()
    try:
        assert kernels.resolve("cpu_tuned").operand_dtype(jnp.bfloat16) == jnp.dtype(expected)
        assert kernels.resolve("cpu_tuned").operand_dtype(jnp.float32) == jnp.float32
        assert kernels.resolve("xla").operand_dtype(jnp.bfloat16) == jnp.bfloat16
    finally:
        kernels.resolve.cache_clear()


def test_unknown_bf16_dot_choice_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(kernels.BF16_DOTS_ENV, "fp8")
    kernels.resolve.cache_clear()
    try:
        with pytest.raises(ValueError, match="T5X_LITE_BF16_DOTS='fp8': use auto, bfloat16 or float32"):
            kernels.resolve("cpu_tuned")
    finally:
        kernels.resolve.cache_clear()


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


def test_float32_dots_of_bf16_matmuls_give_the_bf16_dots_results():
    """Upcasting bf16 operands is exact, so an attention block's loss and gradients barely move (float32
    accumulation either way), and every dot of the backward pass takes the chosen operands too."""
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    kv = jax.random.normal(jax.random.key(2), (2, 8, 32))
    bias = layers.mask_to_bias(layers.padding_mask(jnp.array([[1] * 8, [1] * 5 + [0] * 3])))
    results = {}
    for operands in ("bfloat16", "float32"):
        ops = kernels.Kernels("cpu_tuned", operands)
        graphdef, state = nnx.split(
            attention.MultiHeadAttention(32, 2, 8, kernels=ops, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        )

        def loss(state, x, kv, graphdef=graphdef):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x, kv, bias).astype(jnp.float32)))

        grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2))
        dtypes = dot_operand_dtypes(jax.make_jaxpr(grad_fn)(state, x, kv).jaxpr)
        # 6 forward dots (4 projections, 2 attention products), 12 backward ones, and the bias gradient's
        # two float32 sums with a vector of ones (the cpu_tuned bias add).
        assert len(dtypes) == 6 + 12 + 2
        assert dtypes.count(jnp.dtype(jnp.bfloat16)) == (18 if operands == "bfloat16" else 0)
        results[operands] = jax.jit(grad_fn)(state, x, kv)
    (value16, grads16), (value32, grads32) = results["bfloat16"], results["float32"]
    assert float(value32) == pytest.approx(float(value16), rel=1e-2)
    for g16, g32 in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32)):
        assert float(jnp.linalg.norm(g32 - g16)) <= 1e-2 * float(jnp.linalg.norm(g16)) + 1e-6
