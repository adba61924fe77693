"""Sharded == unsharded: every parallelism layout, microbatching, and restores across meshes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from t5x_lite import checkpoints, partitioning
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5Config
from t5x_lite.training import optimizers, steps, train_state

CONFIG = T5Config(vocab_size=256, d_model=64, num_heads=8, head_dim=8, d_ff=128,
                  num_encoder_layers=1, num_decoder_layers=1)
LAYOUTS = {
    "data8": {"data": 8},
    "fsdp8": {"fsdp": 8},
    "tensor8": {"tensor": 8},
    "2x2x2": {"data": 2, "fsdp": 2, "tensor": 2},
}


def make_batch(seed: int = 0, batch: int = 8, inputs: int = 12, targets: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, CONFIG.vocab_size, (batch, inputs)).astype(np.int32)
    enc[:, -3:] = 0  # padding
    tgt = rng.integers(2, CONFIG.vocab_size, (batch, targets)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt,
            "decoder_loss_weights": np.ones_like(tgt, dtype=np.float32)}


def adafactor():
    return optimizers.adafactor(optimizers.constant_schedule(1e-2), min_dim_size_to_factor=32)


def one_step(mesh_shape, devices=None, num_microbatches=1, batch=None, config=CONFIG):
    """Creates the state on a mesh, runs one train step; returns (loss, params, state shardings).

    Plain SGD by default: its update is linear in the gradient, so params compare gradients
    (Adam/Adafactor normalise near-zero gradients to +-lr, amplifying round-off).
    """
    model = EncoderDecoderModel(config, z_loss=1e-4)
    mesh = partitioning.make_mesh(mesh_shape, devices=devices)
    rules = partitioning.logical_axis_rules()
    tx = optax.sgd(0.5)
    state, shardings, graphdef = train_state.create_train_state(model, tx, 0, mesh, rules)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    step = steps.make_train_step(model, graphdef, tx, optimizers.constant_schedule(1e-2), shardings,
                                 batch_sharding, num_microbatches)
    batch = partitioning.host_batch_to_global(batch or make_batch(), batch_sharding)
    state, metrics = step(state, batch)
    return float(metrics["loss"]), jax.device_get(state.params), shardings


KERNELS = ("cpu_tuned", "xla")


@pytest.fixture(scope="module")
def single_device_steps():
    """One step on one device with each KERNELS set."""
    return {k: one_step({"data": 1}, devices=jax.devices()[:1], config=dataclasses.replace(CONFIG, kernels=k))
            for k in KERNELS}


@pytest.fixture(scope="module")
def single_device_step(single_device_steps):
    return single_device_steps["cpu_tuned"]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_device(layout, kernels, single_device_steps):
    loss, params, _ = one_step(LAYOUTS[layout], config=dataclasses.replace(CONFIG, kernels=kernels))
    ref_loss, ref_params, _ = single_device_steps[kernels]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), params, ref_params)


def test_both_kernel_sets_take_the_same_step(single_device_steps):
    """Without dropout the two KERNELS sets compute the same loss and update (up to float rounding)."""
    (tuned_loss, tuned_params, _), (xla_loss, xla_params, _) = (single_device_steps[k] for k in KERNELS)
    np.testing.assert_allclose(xla_loss, tuned_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), xla_params, tuned_params)


def state_shardings(mesh_shape):
    mesh = partitioning.make_mesh(mesh_shape)
    model = EncoderDecoderModel(CONFIG)
    return train_state.create_train_state(model, adafactor(), 0, mesh, partitioning.logical_axis_rules())[1]


def test_bfloat16_step_executes_on_the_mesh(single_device_step):
    """Mixed precision: bf16 activations (params stay float32) run a whole sharded step."""
    loss, params, _ = one_step(LAYOUTS["2x2x2"], config=dataclasses.replace(CONFIG, dtype="bfloat16"))
    np.testing.assert_allclose(loss, single_device_step[0], rtol=2e-2)
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))


def test_shardings_follow_the_rules():
    fsdp = state_shardings(LAYOUTS["fsdp8"])
    assert fsdp.params["encoder"]["layers"][0]["attention"]["query"]["kernel"].spec == P("fsdp", None, None)
    tensor = state_shardings(LAYOUTS["tensor8"])
    assert tensor.params["encoder"]["layers"][0]["attention"]["query"]["kernel"].spec == P(None, "tensor", None)
    assert tensor.params["token_embedder"]["embedding"].spec == P("tensor", None)
    mixed = state_shardings(LAYOUTS["2x2x2"])
    wi = mixed.params["encoder"]["layers"][0]["mlp"]["wi_0"]["kernel"]
    assert wi.spec == P("fsdp", "tensor")
    # Adafactor's factored statistics of wi ([embed] rows, [mlp] columns) follow its sharding.
    factored = {
        tuple(leaf.spec)
        for path, leaf in jax.tree_util.tree_flatten_with_path(mixed.opt_state)[0]
        if "wi_0" in jax.tree_util.keystr(path) and path[1].name in ("v_row", "v_col")
    }
    assert factored == {("fsdp",), ("tensor",)}


def test_indivisible_dimensions_are_replicated():
    mesh = partitioning.make_mesh({"tensor": 8})
    spec = partitioning._fit_to_shape(P("tensor", None), (6, 64), mesh)
    assert spec == P(None, None)


@pytest.mark.parametrize("num_microbatches", [2, 4])
def test_microbatches_equal_the_full_batch(num_microbatches, single_device_step):
    loss, params, _ = one_step(LAYOUTS["data8"] | {"data": 2}, devices=jax.devices()[:2],
                               num_microbatches=num_microbatches)
    ref_loss, ref_params, _ = single_device_step
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), params, ref_params)


def test_bad_mesh_shapes():
    with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
        partitioning.make_mesh({"data": 4, "fsdp": 4})
    with pytest.raises(ValueError, match="unknown axes"):
        partitioning.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="more than one -1"):
        partitioning.make_mesh({"data": -1, "fsdp": -1})


@pytest.mark.parametrize("target", ["fsdp2_tensor4", "one_device"])
def test_checkpoint_restores_onto_another_mesh(tmp_path, target):
    import tensorflow as tf

    from t5x_lite.data.position import DataIterator, DataLayout

    model = EncoderDecoderModel(CONFIG)
    tx = adafactor()
    rules = partitioning.logical_axis_rules()
    saved, _, _ = train_state.create_train_state(model, tx, 0, partitioning.make_mesh({"data": 8}), rules)

    def iterator():
        return DataIterator(lambda layout, shard: tf.data.Dataset.range(4).map(lambda x: {"x": x}),
                            DataLayout("shard_info", 1, 1), 0, 1)

    manager = checkpoints.checkpoint_manager(str(tmp_path), async_save=False)
    checkpoints.save(manager, saved, iterator())
    if target == "one_device":
        mesh = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
    else:
        mesh = partitioning.make_mesh({"fsdp": 2, "tensor": 4})
    fresh, shardings, _ = train_state.create_train_state(model, tx, 1, mesh, rules)
    restored = checkpoints.restore_latest(manager, train_state.abstract_train_state(fresh, shardings), iterator())
    manager.close()
    jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(f"{a.sharding} != {s}"),
                 restored, shardings)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved), jax.device_get(restored))
    assert jnp.asarray(restored.step) == 0
