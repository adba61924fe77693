"""The loss against optax's reference formulas; schedules and optimizers as documented."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite.training import losses, optimizers


def random_batch(seed=0, vocab=50):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    logits = 3.0 * jax.random.normal(k1, (2, 7, vocab))
    targets = jax.random.randint(k2, (2, 7), 0, vocab)
    weights = (jax.random.uniform(k3, (2, 7)) > 0.3).astype(jnp.float32)
    return logits, targets, weights


def test_cross_entropy_matches_optax():
    logits, targets, weights = random_batch()
    sums = losses.cross_entropy(logits, targets, weights)
    reference = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(sums["loss_sum"], jnp.sum(reference * weights), rtol=1e-5)
    np.testing.assert_allclose(sums["weight_sum"], weights.sum())
    correct = (logits.argmax(-1) == targets) * weights
    np.testing.assert_allclose(sums["correct_sum"], correct.sum())


def test_accuracy_counts_argmax_hits_first_index_on_ties():
    """A tied maximum predicts its first index, as argmax does: all-equal logits are right only for token 0."""
    logits = jnp.zeros((1, 3, 4)).at[0, 2, 1].set(5.0).at[0, 2, 3].set(5.0)
    targets = jnp.array([[0, 2, 1]])
    sums = losses.cross_entropy(logits, targets, jnp.ones((1, 3)))
    assert float(sums["correct_sum"]) == 2.0  # row 0: tie -> 0 (hit); row 1: tie -> 0 (miss); row 2: 1 (hit)


def test_cross_entropy_gradient_matches_optax():
    logits, targets, weights = random_batch(3)

    def ours(x):
        return losses.cross_entropy(x, targets, weights, z_loss=1e-4)["loss_sum"]

    def reference(x):
        token = optax.softmax_cross_entropy_with_integer_labels(x, targets) + 1e-4 * jax.nn.logsumexp(x, -1) ** 2
        return jnp.sum(token * weights)

    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits), rtol=1e-5, atol=1e-6)


def test_label_smoothing_is_kl_to_the_smoothed_distribution():
    logits, targets, weights = random_batch(1)
    vocab, smoothing = logits.shape[-1], 0.1
    sums = losses.cross_entropy(logits, targets, weights, label_smoothing=smoothing)
    low = smoothing / (vocab - 1)
    soft = jax.nn.one_hot(targets, vocab) * (1 - smoothing - low) + low
    kl = jnp.sum(soft * (jnp.log(soft) - jax.nn.log_softmax(logits)), axis=-1)
    np.testing.assert_allclose(sums["loss_sum"], jnp.sum(kl * weights), rtol=1e-5)
    # A perfect prediction of the smoothed distribution costs nothing.
    perfect = losses.cross_entropy(jnp.log(soft), targets, jnp.ones_like(weights), label_smoothing=smoothing)
    np.testing.assert_allclose(perfect["loss_sum"], 0.0, atol=1e-4)


def test_z_loss_adds_squared_log_normaliser():
    logits, targets, weights = random_batch(2)
    plain = losses.cross_entropy(logits, targets, weights)
    with_z = losses.cross_entropy(logits, targets, weights, z_loss=1e-4)
    expected = 1e-4 * jnp.sum(jnp.square(jax.nn.logsumexp(logits, -1)) * weights)
    np.testing.assert_allclose(with_z["z_loss_sum"], expected, rtol=1e-5)
    np.testing.assert_allclose(with_z["loss_sum"] - plain["loss_sum"], expected, atol=5e-5)


def test_rsqrt_schedule():
    schedule = optimizers.rsqrt_schedule(base_learning_rate=1.0, warmup_steps=10_000)
    np.testing.assert_allclose(schedule(0), 0.01)
    np.testing.assert_allclose(schedule(10_000), 0.01)
    np.testing.assert_allclose(schedule(40_000), 0.005)


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_warmup_decay_schedule(decay):
    schedule = optimizers.warmup_decay_schedule(peak_learning_rate=1e-3, warmup_steps=10, total_steps=110, decay=decay)
    np.testing.assert_allclose(schedule(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(schedule(5), 5e-4, rtol=1e-5)
    np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-5)
    np.testing.assert_allclose(schedule(60), 5e-4, rtol=1e-5)  # halfway down, for both shapes
    np.testing.assert_allclose(schedule(110), 0.0, atol=1e-9)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="decay must be 'linear' or 'cosine'"):
        optimizers.warmup_decay_schedule(total_steps=10, decay="step")
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        optimizers.rsqrt_schedule(warmup_steps=0)


# T5X's Adafactor defaults (t5x/adafactor.py), spelled out in optax's terms.
T5_ADAFACTOR = {
    "decay_rate": 0.8, "decay_offset": 0, "clipping_threshold": 1.0, "multiply_by_parameter_scale": True,
    "momentum": None, "factored": True, "min_dim_size_to_factor": 128, "weight_decay_rate": None, "eps": 1e-30,
}


def updates_over_steps(tx: optax.GradientTransformation, steps: int = 4) -> list[dict[str, np.ndarray]]:
    """Each step's updates on a matrix above the factoring threshold and one below it, for gradients whose
    size jumps between steps (so update clipping and the second-moment decay both matter)."""
    keys = jax.random.split(jax.random.key(0), 2 + steps)
    params = {"big": 0.3 * jax.random.normal(keys[0], (256, 128)), "small": 2.0 * jax.random.normal(keys[1], (64, 32))}
    state = tx.init(params)
    out = []
    for step, scale in zip(range(steps), (1.0, 50.0, 0.1, 20.0)):
        grads = jax.tree.map(lambda p, k=keys[2 + step], s=scale: s * jax.random.normal(k, p.shape), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(jax.device_get(updates))
    return out


def same_updates(a: list[dict], b: list[dict]) -> bool:
    return all(np.allclose(x, y, rtol=1e-6, atol=0) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_adafactor_has_t5s_settings():
    """Our Adafactor equals optax's with T5X's settings, step for step; changing any one of them would show."""
    schedule = optimizers.constant_schedule(1e-2)
    ours = updates_over_steps(optimizers.adafactor(schedule))
    assert same_updates(ours, updates_over_steps(optax.adafactor(schedule, **T5_ADAFACTOR)))
    changes = {"decay_rate": 0.9, "clipping_threshold": None, "multiply_by_parameter_scale": False, "momentum": 0.9,
               "factored": False, "min_dim_size_to_factor": 32, "weight_decay_rate": 1e-2}
    for name, value in changes.items():
        changed = updates_over_steps(optax.adafactor(schedule, **{**T5_ADAFACTOR, name: value}))
        assert not same_updates(ours, changed), f"the updates do not depend on {name}"


def test_adafactor_factors_large_matrices_and_descends():
    params = {"w": jnp.ones((256, 128)), "small": jnp.ones((64, 32)), "b": jnp.ones((4,))}
    tx = optimizers.adafactor(optimizers.constant_schedule(1e-2))
    state = tx.init(params)
    shapes = sorted(s.shape for s in jax.tree.leaves(state) if s.ndim)
    # Row and column statistics of the 256x128 matrix; the 64x32 one (below 128) and the vector keep a full
    # second moment; no first moment (momentum) at all. Unused statistics are optax's 1-element placeholders.
    assert [s for s in shapes if s != (1,)] == [(4,), (64, 32), (128,), (256,)]

    def loss(p):
        return jnp.sum(jnp.square(p["w"] - 2.0)) + jnp.sum(jnp.square(p["small"])) + jnp.sum(jnp.square(p["b"]))

    initial = loss(params)
    for _ in range(5):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert loss(params) < initial


def test_adamw_clips_gradients():
    """The global norm is clipped to 1 before Adam: with gradients whose size changes between steps the updates
    equal clipped AdamW's and differ from unclipped AdamW's (Adam alone ignores a constant scale, not a varying one)."""
    schedule = optimizers.constant_schedule(1e-3)
    params = {"w": jnp.zeros(3)}
    grads = [jnp.array([300.0, 400.0, 0.0]), jnp.array([0.3, 0.0, 0.4]), jnp.array([0.0, 30.0, 40.0])]

    def updates(tx):
        state, out = tx.init(params), []
        for g in grads:
            u, state = tx.update({"w": g}, state, params)
            out.append(np.asarray(u["w"]))
        return np.stack(out)

    adamw = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    ours = updates(optimizers.adamw(schedule, max_grad_norm=1.0))
    np.testing.assert_allclose(ours, updates(optax.chain(optax.clip_by_global_norm(1.0), adamw)), rtol=1e-6)
    assert not np.allclose(ours, updates(adamw), rtol=1e-3)
    np.testing.assert_allclose(updates(optimizers.adamw(schedule, max_grad_norm=None)), updates(adamw), rtol=1e-6)
