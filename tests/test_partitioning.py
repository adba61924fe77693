"""Sharded == unsharded: every parallelism layout, microbatching, and restores across meshes; activation
sharding constraints in every layout, and the report of replicated dimensions."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
from flax import nnx
from jax.sharding import PartitionSpec as P

from t5x_lite import checkpoints, evaluation, partitioning
from t5x_lite.models.causal import DecoderOnlyModel
from t5x_lite.models.encoder import EncoderClassificationModel, EncoderOnlyMLMModel, EncoderTaggingModel
from t5x_lite.models.seq2seq import BartModel, EncoderDecoderModel
from t5x_lite.networks.bart import BartConfig
from t5x_lite.networks.bert import BertConfig
from t5x_lite.networks.gpt import GPTConfig
from t5x_lite.networks.t5 import T5, T5Config
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


# ---------------------------------------------------------------------------------------------
# Activation sharding

GPT_CONFIG = GPTConfig(vocab_size=256, d_model=64, num_heads=8, head_dim=8, d_ff=128, num_layers=1,
                       max_position_embeddings=16)
BART_CONFIG = BartConfig(vocab_size=256, d_model=64, num_heads=8, head_dim=8, d_ff=128, num_encoder_layers=1,
                         num_decoder_layers=1, max_position_embeddings=16)
BERT_CONFIG = BertConfig(vocab_size=256, d_model=64, num_heads=8, head_dim=8, d_ff=128, num_layers=1,
                         max_position_embeddings=16, num_labels=3)
# Layout -> the mesh axes of an activation's batch dimension, and of its heads, mlp or vocab dimension.
ACTIVATION_AXES = {
    "data8": (("data",), ()),
    "fsdp8": (("fsdp",), ()),
    "tensor8": ((), ("tensor",)),
    "2x2x2": (("data", "fsdp"), ("tensor",)),
}


def gpt_batch(batch: int = 8, length: int = 12) -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(0).integers(2, GPT_CONFIG.vocab_size, (batch, length + 1)).astype(np.int32)
    return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
            "decoder_loss_weights": np.ones((batch, length), np.float32)}


def bert_batch(batch: int = 8, length: int = 12, head: str = "mlm") -> dict[str, np.ndarray]:
    """A BERT batch: 2 masked positions per row (MLM), or a label per row / a tag per token."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, BERT_CONFIG.vocab_size, (batch, length)).astype(np.int32)
    if head == "classification":
        return {"encoder_input_tokens": tokens, "labels": rng.integers(0, 3, (batch, 1)).astype(np.int32)}
    if head == "tagging":
        return {"encoder_input_tokens": tokens, "encoder_target_tokens": rng.integers(1, 3, tokens.shape).astype(np.int32),
                "encoder_loss_weights": np.ones(tokens.shape, np.float32)}
    weights = np.zeros(tokens.shape, np.float32)
    weights[:, 3:5] = 1
    return {"encoder_input_tokens": np.where(weights > 0, 4, tokens).astype(np.int32),
            "encoder_target_tokens": tokens, "encoder_loss_weights": weights}


def family_case(family: str, kernels: str = "auto", scan: bool = False):
    """(model, batch, {activation shape: its logical role}) of a tiny network of `family` with 8 rows of 12
    tokens (6 targets for the encoder-decoders). BERT's masked-LM logits cover its loss budget (a quarter of
    the 96 positions, as rows), and also every position (the loss's other branch)."""
    def config(base):
        return dataclasses.replace(base, kernels=kernels, scan_layers=scan)

    length, targets = 12, 12
    if family == "t5":
        model, batch, targets = EncoderDecoderModel(config(CONFIG)), make_batch(), 6
    elif family == "bart":
        model, batch, targets = BartModel(config(BART_CONFIG)), make_batch(), 6
    elif family == "gpt":
        model, batch = DecoderOnlyModel(config(GPT_CONFIG)), gpt_batch(length=length)
    else:
        model, batch = EncoderOnlyMLMModel(config(BERT_CONFIG)), bert_batch(length=length)
    roles = {
        (8, 8, length, length): "attention_logits",  # [b, heads, q, k]
        (8, length, 8, 8): "heads",  # queries, keys, values, per-head outputs [b, s, heads, kv]
        (8, length, 128): "mlp",  # MLP hidden [b, s, mlp]
        (8, length, 64): "embed",  # residual stream [b, s, embed]
    }
    if family == "bert":
        roles |= {(24, 1, 256): "vocab", (96, 1, 256): "vocab"}  # masked-LM logits [positions, 1, vocab]
    else:
        roles[(8, targets, 256)] = "vocab"  # output logits [b, s, vocab]
    return model, batch, roles


def expected_sharding(role: str, layout: str) -> tuple[tuple[str, ...], ...]:
    """The mesh axes, per dimension, of an activation of `role` in `layout`."""
    batch, split = ACTIVATION_AXES[layout]
    return {"attention_logits": (batch, split, (), ()), "heads": (batch, (), split, ()), "mlp": (batch, (), split),
            "embed": (batch, (), ()), "vocab": (batch, (), split), "classes": (batch, ())}[role]


def build_step(model, mesh_shape, devices=None):
    """(train step, state, graphdef, batch sharding) of `model` on a mesh, as `train()` builds them."""
    mesh = partitioning.make_mesh(mesh_shape, devices=devices)
    rules = partitioning.logical_axis_rules()
    tx = optax.sgd(0.5)
    state, shardings, graphdef = train_state.create_train_state(model, tx, 0, mesh, rules)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    step = steps.make_train_step(model, graphdef, tx, optimizers.constant_schedule(1e-2), shardings, batch_sharding)
    return step, state, graphdef, batch_sharding


def batch_shapes(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in batch.items()}


CONSTRAINT = re.compile(r"sdy\.sharding_constraint %\S+ <@\w+, \[(.*?)\]>.*: tensor<([\dx]+)xf32>")


def constraints_in(text: str) -> dict[tuple[int, ...], set]:
    """The sharding constraints in a lowered program's text: float32 shape -> the shardings seen on it, each as
    one tuple of mesh axes per dimension."""
    found: dict[tuple[int, ...], set] = {}
    for dims, shape in CONSTRAINT.findall(text):
        sharding = tuple(tuple(re.findall(r'"(\w+)"', dim)) for dim in re.findall(r"\{[^}]*\}", dims))
        found.setdefault(tuple(int(n) for n in shape.split("x")), set()).add(sharding)
    return found


def lowered_constraints(model, batch, mesh_shape, devices=None) -> dict[tuple[int, ...], set]:
    """The sharding constraints in the lowered train step (see `constraints_in`)."""
    step, state, _, batch_sharding = build_step(model, mesh_shape, devices)
    return constraints_in(step.lower(state, batch_shapes(batch, batch_sharding)).as_text())


def assert_constrained(found: dict, roles: dict, layout: str) -> None:
    expected = {shape: {expected_sharding(role, layout)} for shape, role in roles.items()}
    assert {shape: found.get(shape) for shape in expected} == expected


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", ["t5", "bart", "gpt", "bert"])
def test_activations_are_constrained_in_every_layout(family, layout):
    """The lowered train step pins the attention logits, queries/keys/values, MLP hidden layer, residual
    stream and output logits to the layout's shardings (forward and backward)."""
    model, batch, roles = family_case(family)
    assert_constrained(lowered_constraints(model, batch, LAYOUTS[layout]), roles, layout)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("family", ["t5", "bart", "gpt", "bert"])
def test_scanned_stacks_with_either_kernel_set_are_constrained_and_match_one_device(family, kernels):
    """Scanned layers under both KERNELS sets: the same constraints (inside the scan) on the 2x2x2 mesh, and the
    same loss and update as one device."""
    model, batch, roles = family_case(family, kernels, scan=True)
    assert_constrained(lowered_constraints(model, batch, LAYOUTS["2x2x2"]), roles, "2x2x2")
    assert_matches_one_device(model, batch)


def assert_matches_one_device(model, batch) -> None:
    """One train step of `model` on the 2x2x2 mesh takes the same loss and update as on one device."""
    results = []
    for mesh_shape, devices in (({"data": 1}, jax.devices()[:1]), (LAYOUTS["2x2x2"], None)):
        step, state, _, batch_sharding = build_step(model, mesh_shape, devices)
        state, metrics = step(state, partitioning.host_batch_to_global(batch, batch_sharding))
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
    (loss, params), (ref_loss, ref_params) = results[1], results[0]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), params, ref_params)


@pytest.mark.parametrize("head", ["classification", "tagging"])
def test_bert_heads_are_constrained(head):
    """The classification and tagging heads' logits keep the batch split (their classes are not split)."""
    model_cls = EncoderClassificationModel if head == "classification" else EncoderTaggingModel
    found = lowered_constraints(model_cls(BERT_CONFIG), bert_batch(head=head), LAYOUTS["2x2x2"])
    shape = (8, 3) if head == "classification" else (8, 12, 3)
    batch_axes = ACTIVATION_AXES["2x2x2"][0]
    assert found[shape] == {(batch_axes, *([()] * (len(shape) - 1)))}
    assert found[(8, 12, 64)] == {expected_sharding("embed", "2x2x2")}
    assert_matches_one_device(model_cls(BERT_CONFIG), bert_batch(head=head))


@pytest.mark.parametrize("family", ["t5", "gpt"])
def test_decoding_is_constrained_and_matches_one_device(family):
    """Inference (evaluation's `ModelRunner`, greedy) constrains the decoder's activations on the mesh and
    predicts the same tokens as one device."""
    model, batch, _ = family_case(family)
    network = model.build_network(nnx.Rngs(0))
    graphdef, params = nnx.split(network, nnx.Param)
    features = tf.data.Dataset.from_tensor_slices(model.predict_features(batch)).enumerate()
    rules = partitioning.logical_axis_rules()
    predictions = []
    for mesh_shape, devices in (({"data": 1}, jax.devices()[:1]), (LAYOUTS["2x2x2"], None)):
        runner = evaluation.ModelRunner(model, graphdef, partitioning.make_mesh(mesh_shape, devices=devices), rules,
                                        batch_size=8, eos_id=-1)
        predictions.append(runner.predict(params, features, max_decode_length=4))
    assert predictions[0] == predictions[1]
    features = runner._to_device(model.predict_features(batch))
    text = runner._predict.lower(params, features, jax.random.key(0), 4).as_text()
    one_position = (8, 1, 8, 8)  # the query, key and value of the position decoded [b, 1, heads, kv]
    assert constraints_in(text)[one_position] == {expected_sharding("heads", "2x2x2")}


def test_constraints_are_no_ops_without_a_mesh_and_on_one_device():
    """A network called outside a step traces no constraint; a step on one device lowers none."""
    network = T5(CONFIG, rngs=nnx.Rngs(0))
    batch = make_batch()
    jaxpr = jax.make_jaxpr(lambda: network(batch["encoder_input_tokens"], batch["decoder_input_tokens"]))()
    assert "sharding_constraint" not in str(jaxpr)
    found = lowered_constraints(EncoderDecoderModel(CONFIG), batch, {"data": 1}, devices=jax.devices()[:1])
    assert found == {}


def test_constrain_outside_a_step_returns_its_input():
    x = jnp.ones((2, 3, 4))
    assert partitioning.constrain(x, "residual", ("batch", "length", "embed")) is x


def replication_lines(config, mesh_shape):
    model = EncoderDecoderModel(config)
    step, state, graphdef, batch_sharding = build_step(model, mesh_shape)
    found = steps.replicated_dimensions(step, state, graphdef, batch_shapes(make_batch(), batch_sharding),
                                       partitioning.logical_axis_rules())
    return partitioning.replication_report(found)


def test_replication_report_names_each_dimension_the_mesh_cannot_split():
    """A vocabulary of 250 on `tensor: 8`: the embedding, the output kernel and the logits stay whole."""
    def line(kind, name, shape, dim, cost):
        return (f"{kind} {name} {shape} float32: dimension {dim} (250) is not divisible by tensor=8, so it is "
                f"replicated: {cost} more per device")

    assert replication_lines(dataclasses.replace(CONFIG, vocab_size=250), {"tensor": 8}) == [
        line("Parameter", "logits_dense/kernel", [64, 250], 1, "54.7 KiB") + ".",
        line("Parameter", "token_embedder/embedding", [250, 64], 0, "54.7 KiB") + ".",
        line("Activation", "logits", [8, 6, 250], 2, "41.0 KiB") + " per array.",
    ]


def test_replication_report_folds_the_layers_and_is_empty_when_everything_splits():
    """6 heads over `tensor: 4`: one line per parameter kind of the two layers, one per activation."""
    config = dataclasses.replace(CONFIG, num_heads=6, num_encoder_layers=2, num_decoder_layers=1)
    lines = replication_lines(config, {"data": 2, "tensor": 4})
    assert ("Parameter encoder/layers/*/attention/query/kernel [64, 6, 8] float32: dimension 1 (6) is not divisible "
            "by tensor=4, so it is replicated: 18.0 KiB more per device (2 parameters).") in lines
    assert ("Activation attention/logits [8, 6, 12, 12] float32: dimension 1 (6) is not divisible by tensor=4, "
            "so it is replicated: 20.2 KiB more per device per array.") in lines
    assert not any("mlp" in line for line in lines)
    assert replication_lines(CONFIG, {"data": 2, "tensor": 4}) == []


def test_the_report_trace_is_the_first_step_trace(monkeypatch):
    """Asking for the replicated dimensions before the first step traces the step once, for both."""
    model = EncoderDecoderModel(CONFIG)
    traces = []
    loss_fn = model.loss_fn
    monkeypatch.setattr(model, "loss_fn", lambda *args: traces.append(1) or loss_fn(*args))
    step, state, graphdef, batch_sharding = build_step(model, LAYOUTS["2x2x2"])
    steps.replicated_dimensions(step, state, graphdef, batch_shapes(make_batch(), batch_sharding),
                                partitioning.logical_axis_rules())
    step(state, partitioning.host_batch_to_global(make_batch(), batch_sharding))
    assert len(traces) == 1
