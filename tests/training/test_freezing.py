"""Selective fine-tuning: presets, frozen parameters after real train steps, gradual unfreezing."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from t5x_lite import cli, partitioning
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5Config
from t5x_lite.training import freezing, optimizers, steps, train_state

CONFIG = T5Config(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=1,
                  num_decoder_layers=2)


def abstract_params(config: T5Config = CONFIG) -> dict:
    return nnx.to_pure_dict(train_state.network_graphdef(EncoderDecoderModel(config))[1])


def test_presets_select_what_they_say():
    params = abstract_params()
    paths = set(freezing.param_paths(params))
    assert freezing.select(params, "all") == paths
    top1 = freezing.select(params, "top_k_layers=1")
    assert top1 == {p for p in paths if p.startswith(("encoder/layers/0/", "decoder/layers/1/"))}
    top1_decoder = freezing.select(params, "top_k_decoder_layers=1")
    assert top1_decoder == {p for p in paths if p.startswith("decoder/layers/1/")}
    assert len(top1_decoder) == 4 * 2 + 3 + 3  # 2 attentions, the gated MLP, 3 norms
    assert freezing.select(params, "top_k_decoder_layers=9") == {p for p in paths if p.startswith("decoder/layers/")}
    norms = freezing.select(params, "layer_norms_only")
    # 2 per encoder layer, 3 per decoder layer, and the two final norms.
    assert len(norms) == 2 * 1 + 3 * 2 + 2 and all(p.endswith("norm/scale") for p in norms)
    assert freezing.select(params, "heads_only") == {"logits_dense/kernel"}
    assert freezing.select(params, "-embeddings") == paths - {"token_embedder/embedding"}
    assert freezing.select(params, ["top_k_layers=1", "layer_norms", "-decoder/"]) == (
        {p for p in top1 | norms if not p.startswith("decoder/")}
    )
    assert freezing.select(params, r"decoder/layers/[01]/mlp/") == {
        f"decoder/layers/{i}/mlp/{n}/kernel" for i in (0, 1) for n in ("wi_0", "wi_1", "wo")
    }


def test_top_layers_in_every_family():
    """GPT and BERT name their one stack `layers`, BART its two `encoder_layers`/`decoder_layers`."""
    from t5x_lite.networks.bart import Bart, BartConfig
    from t5x_lite.networks.bert import Bert, BertConfig
    from t5x_lite.networks.gpt import GPT, GPTConfig

    sizes = {"vocab_size": 64, "d_model": 16, "num_heads": 2, "head_dim": 8, "d_ff": 32, "max_position_embeddings": 16}
    networks = {
        "gpt": GPT(GPTConfig(**sizes, num_layers=3), rngs=nnx.Rngs(0)),
        "bert": Bert(BertConfig(**sizes, num_layers=3), rngs=nnx.Rngs(0)),
        "bart": Bart(BartConfig(**sizes, num_encoder_layers=2, num_decoder_layers=3), rngs=nnx.Rngs(0)),
    }
    top = {}
    for name, network in networks.items():
        params = nnx.to_pure_dict(nnx.state(network, nnx.Param))
        top[name] = freezing.select(params, "top_k_layers=2")
        assert top[name] and all(p.split("/")[0].endswith("layers") for p in top[name]), name
    assert {p.split("/")[1] for p in top["gpt"]} == {p.split("/")[1] for p in top["bert"]} == {"1", "2"}
    assert {tuple(p.split("/")[:2]) for p in top["bart"]} == {
        ("encoder_layers", "0"), ("encoder_layers", "1"), ("decoder_layers", "1"), ("decoder_layers", "2")}
    bart_params = nnx.to_pure_dict(nnx.state(networks["bart"], nnx.Param))
    assert {p.split("/")[:2][1] for p in freezing.select(bart_params, "top_k_decoder_layers=1")} == {"2"}
    scanned = GPT(GPTConfig(**sizes, num_layers=3, scan_layers=True), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs per-layer parameters, but the layers are stacked"):
        freezing.select(nnx.to_pure_dict(nnx.state(scanned, nnx.Param)), "top_k_layers=1")


def test_bad_selections_are_clear_errors():
    params = abstract_params()
    with pytest.raises(ValueError, match=r"'decoder/layers_3/' matches no parameter. Parameter paths look like"):
        freezing.select(params, "decoder/layers_3/")
    with pytest.raises(ValueError, match="'heads' matches no parameter \\(with tied input/output embeddings"):
        freezing.select(abstract_params(T5Config(**{**CONFIG.__dict__, "tie_word_embeddings": True})), "heads")
    with pytest.raises(ValueError, match="needs per-layer parameters.*scan_layers=True"):
        freezing.select(abstract_params(T5Config(**{**CONFIG.__dict__, "scan_layers": True})), "top_k_layers=1")
    with pytest.raises(ValueError, match="neither a preset nor a valid regular expression"):
        freezing.select(params, "decoder/(")
    with pytest.raises(ValueError, match="leaves no trainable parameter"):
        freezing.select(params, ["heads", "-logits"])
    with pytest.raises(ValueError, match="must start at step 0"):
        freezing.selective(optimizers.constant_schedule(), optimizers.adamw, stages=[(5, "all")])
    with pytest.raises(ValueError, match="increasing integers"):
        freezing.selective(optimizers.constant_schedule(), optimizers.adamw, stages=[(0, "heads"), (0, "all")])
    with pytest.raises(ValueError, match="either selective.trainable or selective.stages"):
        freezing.selective(optimizers.constant_schedule(), optimizers.adamw, trainable="heads", stages=[(0, "all")])


def random_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.integers(2, CONFIG.vocab_size, (8, 6)).astype(np.int32)
    return {
        "encoder_input_tokens": rng.integers(2, CONFIG.vocab_size, (8, 10)).astype(np.int32),
        "decoder_input_tokens": np.concatenate([np.zeros((8, 1), np.int32), targets[:, :-1]], axis=1),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones((8, 6), np.float32),
    }


def train(tx: optax.GradientTransformation, num_steps: int):
    """Real sharded train steps on an 8-device FSDP mesh; returns the states after each step."""
    model = EncoderDecoderModel(CONFIG)
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 4})
    rules = partitioning.logical_axis_rules()
    state, shardings, graphdef = train_state.create_train_state(model, tx, 0, mesh, rules)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    step = steps.make_train_step(model, graphdef, tx, optimizers.constant_schedule(1e-2), shardings, batch_sharding)
    history = [jax.device_get(state)]
    for i in range(num_steps):
        state, _ = step(state, partitioning.host_batch_to_global(random_batch(i), batch_sharding))
        history.append(jax.device_get(state))
    return history, state, shardings


def changed_paths(before: dict, after: dict) -> set[str]:
    names = freezing.param_paths(before)
    return {n for n, a, b in zip(names, jax.tree.leaves(before), jax.tree.leaves(after)) if not np.array_equal(a, b)}


def opt_state_size(opt_state) -> tuple[int, int]:
    leaves = jax.tree.leaves(opt_state)
    return len(leaves), sum(x.size * x.dtype.itemsize for x in leaves)


@pytest.mark.slow
def test_frozen_params_stay_bit_identical_and_have_no_optimizer_state(tmp_path):
    schedule = optimizers.constant_schedule(1e-2)
    selection = ["top_k_layers=1", "layer_norms"]
    history, state, shardings = train(freezing.selective(schedule, optimizers.adamw, trainable=selection), 3)
    trainable = freezing.select(history[0].params, selection)
    assert changed_paths(history[0].params, history[-1].params) == trainable
    frozen_leaves, frozen_bytes = opt_state_size(state.opt_state)
    full_leaves, full_bytes = opt_state_size(jax.eval_shape(optimizers.adamw(schedule).init, history[0].params))
    print(f"optimizer state: {frozen_leaves} leaves / {frozen_bytes} bytes frozen vs {full_leaves} / {full_bytes}")
    names = freezing.param_paths(history[0].params)
    trainable_bytes = sum(x.nbytes for n, x in zip(names, jax.tree.leaves(history[0].params)) if n in trainable)
    # Adam's two moments for the trainable parameters only (plus scalar counts), not for all of them.
    assert frozen_leaves < full_leaves and 2 * trainable_bytes <= frozen_bytes < 2 * trainable_bytes + 64
    assert full_bytes > 2 * sum(x.nbytes for x in jax.tree.leaves(history[0].params))
    # Adam moments of a trainable kernel are sharded like the kernel (FSDP over `embed`).
    wo = ("decoder", "layers", 1, "mlp", "wo", "kernel")
    moment = state.opt_state.inner_states["stage_0"].inner_state[1][0].mu
    for key in wo:
        moment = moment[key]
    expected = shardings.params
    for key in wo:
        expected = expected[key]
    assert moment.sharding.spec == expected.spec == jax.sharding.PartitionSpec(None, "fsdp")
    # The wrapped state checkpoints and restores through Orbax.
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "state", train_state.abstract_train_state(state, shardings))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


@pytest.mark.slow
def test_gradual_unfreezing_follows_the_stages():
    stages = [(0, "top_k_decoder_layers=1"), (2, "layer_norms"), (3, "all")]
    history, _, _ = train(freezing.selective(optimizers.constant_schedule(1e-2), optimizers.adamw, stages=stages), 4)
    params = [s.params for s in history]
    top = freezing.select(params[0], "top_k_decoder_layers=1")
    norms = freezing.select(params[0], "layer_norms")
    assert changed_paths(params[0], params[1]) == top
    assert changed_paths(params[1], params[2]) == top
    assert changed_paths(params[2], params[3]) == top | norms  # stage 1 starts with the 3rd update
    assert changed_paths(params[3], params[4]) == set(freezing.param_paths(params[0]))


def test_later_stages_follow_the_global_learning_rate_schedule():
    """A stage starting at step 2 takes the schedule's value at step 2 for its first update."""
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    tx = freezing.selective(schedule, optax.sgd, stages=[(0, "a"), (2, "b")])
    params = {"a": jnp.zeros(()), "b": jnp.zeros(())}
    grads = {"a": jnp.ones(()), "b": jnp.ones(())}
    opt_state = tx.init(params)
    updates = []
    for _ in range(4):
        update, opt_state = tx.update(grads, opt_state, params)
        updates.append((float(update["a"]), float(update["b"])))
    np.testing.assert_allclose(updates, [(-1.0, 0.0), (-0.9, 0.0), (-0.8, -0.8), (-0.7, -0.7)], rtol=1e-6)


def test_example_gin_file_configures_the_staged_optimizer():
    gin.clear_config()
    try:
        cli.parse_gin(["examples/finetune_top_layers.gin", "models/t5_1_1/tiny.gin"],
                         ["MODEL_DIR = '/tmp/unused'", "INITIAL_CHECKPOINT_PATH = None"])
        assert gin.query_parameter("train.optimizer").selector == "selective"
        tx = freezing.selective(optimizers.constant_schedule())  # the gin-bound stages and optimizer
        params = abstract_params(gin.query_parameter("EncoderDecoderModel.config").scoped_configurable_fn())
    finally:
        gin.clear_config()
    opt_state = jax.eval_shape(tx.init, params)
    labels = freezing.stage_labels(params, [(0, "top_k_layers=2"), (300, "layer_norms"), (600, "all")])
    assert set(opt_state.inner_states) == {"frozen", "stage_0", "stage_1", "stage_2"}
    by_label = {}
    for path, label in zip(freezing.param_paths(params), jax.tree.leaves(labels)):
        by_label.setdefault(label, set()).add(path)
    assert by_label["stage_0"] == freezing.select(params, "top_k_layers=2")
    assert by_label["stage_1"] == freezing.select(params, "layer_norms") - by_label["stage_0"]
