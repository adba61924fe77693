"""LoRA (t5x_lite/adapters/lora.py): a zero B changes nothing, only adapters train and keep optimizer state,
merged kernels give the adapter's logits, adapter-only checkpoints resume onto their base, bad targets."""

from __future__ import annotations

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from t5x_lite import adapters, checkpoints, cli, partitioning
from t5x_lite.adapters import lora
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.bart import Bart, BartConfig
from t5x_lite.networks.bert import Bert, BertConfig
from t5x_lite.networks.gpt import GPT, GPTConfig
from t5x_lite.networks.t5 import T5, T5Config
from t5x_lite.training import freezing, optimizers, steps, train_state
from tests.test_cli import run_cli

SIZES = {"vocab_size": 64, "d_model": 16, "num_heads": 2, "head_dim": 8, "d_ff": 32}
T5_CONFIG = T5Config(**SIZES, num_encoder_layers=1, num_decoder_layers=2)
LORA = lora.LoRAConfig(rank=4, alpha=8.0)
TOKENS = np.random.default_rng(0).integers(2, 64, (2, 7)).astype(np.int32)


def family_logits(name: str, scan: bool):
    """(network, its logits on TOKENS as a function of the network) of a tiny model of each family."""
    position = {"max_position_embeddings": 16}
    if name == "t5":
        return T5(T5Config(**{**T5_CONFIG.__dict__, "scan_layers": scan}), rngs=nnx.Rngs(0)), lambda n: n(
            TOKENS, TOKENS[:, :5])
    if name == "bart":
        config = BartConfig(**SIZES, **position, num_encoder_layers=1, num_decoder_layers=2, scan_layers=scan)
        return Bart(config, rngs=nnx.Rngs(0)), lambda n: n(TOKENS, TOKENS[:, :5])
    if name == "gpt":
        return GPT(GPTConfig(**SIZES, **position, num_layers=2, scan_layers=scan), rngs=nnx.Rngs(0)), lambda n: n(
            TOKENS)
    return Bert(BertConfig(**SIZES, **position, num_layers=2, scan_layers=scan), rngs=nnx.Rngs(0)), lambda n: n(TOKENS)


def randomize_b(network: nnx.Module) -> None:
    """Nonzero B matrices, as after some training."""
    for i, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(network, lora.LoRAParam))):
        if variable.shape[-1] != LORA.rank:  # B: [layers?, rank, out...]
            variable[...] = jax.random.normal(jax.random.key(i), variable.shape) * 0.1


@pytest.mark.parametrize("family,scan", [("t5", False), ("t5", True), ("bart", False), ("gpt", True), ("bert", False)])
def test_zero_b_keeps_the_logits_and_merging_keeps_the_adapted_ones(family, scan):
    network, logits = family_logits(family, scan)
    base = logits(network)
    paths = lora.apply_lora(network, LORA, nnx.Rngs(1))
    assert paths and all(p.endswith(("query/kernel", "value/kernel")) for p in paths)
    np.testing.assert_array_equal(logits(network), base)  # B = 0: not one bit changes
    variables = dict(nnx.to_flat_state(nnx.state(network, adapters.AdapterParam)))
    assert variables and all(isinstance(v, nnx.LoRAParam) and adapters.is_adapter_param(v) for v in variables.values())
    randomize_b(network)
    adapted = logits(network)
    assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-3
    # Folding A B * alpha / rank into the kernels gives a plain network with the adapted logits.
    params = nnx.to_pure_dict(nnx.state(network, nnx.Param))
    plain, _ = family_logits(family, scan)
    state = nnx.state(plain, nnx.Param)
    nnx.replace_by_pure_dict(state, lora.merged_params(params, LORA.scale))
    nnx.update(plain, state)
    np.testing.assert_allclose(logits(plain), adapted, atol=1e-5, rtol=1e-5)


def test_adapters_shard_like_their_kernels():
    network = T5(T5Config(**{**T5_CONFIG.__dict__, "scan_layers": True}), rngs=nnx.Rngs(0))
    lora.apply_lora(network, LORA, nnx.Rngs(1))
    query = network.encoder.layers.attention.query
    assert query.kernel.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "kv")
    assert query.adapter.lora_a.get_metadata()["logical_axes"] == ("layers", "embed", None)
    assert query.adapter.lora_b.get_metadata()["logical_axes"] == ("layers", None, "heads", "kv")
    out = network.encoder.layers.attention.out
    lora.apply_lora(network, lora.LoRAConfig(targets="encoder/layers/attention/out/kernel"), nnx.Rngs(2))
    assert out.adapter.lora_a.shape == (1, 2, 8, 8) and out.adapter.lora_b.shape == (1, 8, 16)


def test_bad_targets_are_clear_errors():
    network = T5(T5_CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"LoRAConfig.targets: Selection term 'attention/qq' matches no parameter"):
        lora.apply_lora(network, lora.LoRAConfig(targets=["attention/qq"]), nnx.Rngs(1))
    with pytest.raises(ValueError, match="select decoder/decoder_norm/scale, which is not a projection kernel"):
        lora.apply_lora(network, lora.LoRAConfig(targets="decoder_norm"), nnx.Rngs(1))
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        lora.LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="LoRA input dropout is not supported yet"):
        lora.LoRAConfig(dropout=0.1)


@pytest.fixture
def lora_bound():
    """`add_adapters.lora` bound as a LoRA gin file binds it."""
    gin.clear_config()
    gin.bind_parameter("add_adapters.lora", LORA)
    yield
    gin.clear_config()


def random_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.integers(2, 64, (8, 6)).astype(np.int32)
    return {
        "encoder_input_tokens": rng.integers(2, 64, (8, 10)).astype(np.int32),
        "decoder_input_tokens": np.concatenate([np.zeros((8, 1), np.int32), targets[:, :-1]], axis=1),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones((8, 6), np.float32),
    }


def test_only_adapters_train_and_have_optimizer_state(lora_bound, tmp_path):
    model = EncoderDecoderModel(T5_CONFIG)
    schedule = optimizers.constant_schedule(1e-2)
    paths = adapters.adapter_paths(train_state.network_graphdef(model)[1])
    tx = freezing.train_only(optimizers.adamw(schedule), paths)
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 4})
    rules = partitioning.logical_axis_rules()
    state, shardings, graphdef = train_state.create_train_state(model, tx, 0, mesh, rules)
    before = jax.device_get(state.params)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    step = steps.make_train_step(model, graphdef, tx, schedule, shardings, batch_sharding)
    for i in range(3):
        state, _ = step(state, partitioning.host_batch_to_global(random_batch(i), batch_sharding))
    after = jax.device_get(state.params)
    names = freezing.param_paths(before)
    changed = {n for n, a, b in zip(names, jax.tree.leaves(before), jax.tree.leaves(after)) if not np.array_equal(a, b)}
    assert changed == paths  # the base is bit-identical; every A and B moved
    adapter_bytes = sum(x.nbytes for n, x in zip(names, jax.tree.leaves(before)) if n in paths)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    assert 2 * adapter_bytes <= opt_bytes < 2 * adapter_bytes + 64  # Adam's moments of the adapters only
    # A shards like its kernel's input axis (FSDP over `embed`).
    query_a = shardings.params["encoder"]["layers"][0]["attention"]["query"]["adapter"]["lora_a"]
    assert query_a.spec == jax.sharding.PartitionSpec("fsdp", None)
    # The adapter-only checkpoint holds the adapters and their optimizer state, nothing of the base.
    saved = checkpoints.checkpointed(state, paths)
    assert set(freezing.param_paths(saved.params)) == paths
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", saved)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "state", checkpoints.checkpointed(
        train_state.abstract_train_state(state, shardings), paths))
    merged = adapters.merge_params(before, jax.device_get(restored.params))
    jax.tree.map(np.testing.assert_array_equal, merged, after)


@pytest.mark.slow
def test_a_target_that_matches_nothing_is_one_error_line(tmp_path):
    result = run_cli(
        "--gin_file=gin_configs/examples/lora_finetune_qa.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
        "--gin.INITIAL_CHECKPOINT_PATH=None", "--gin.LoRAConfig.targets=['attention/qkv']",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: LoRAConfig.targets: Selection term 'attention/qkv' matches no parameter. Parameter paths look like"
    ), result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_lora_run_resumes_from_adapter_only_checkpoints_and_merges(tmp_path):
    """Quickstart-sized: a LoRA run on a base checkpoint, stopped and resumed, then tools/merge_lora.py."""
    import sys

    from tests.training.test_train import restore_params, run_training

    sys.path.insert(0, str(cli.GIN_CONFIGS_DIR.parent / "tools"))
    import merge_lora

    base, run, merged = tmp_path / "base", tmp_path / "lora", tmp_path / "merged"
    gin_file = str(cli.GIN_CONFIGS_DIR / "quickstart.gin")
    cli.parse_gin([gin_file], ["merged_model.model = %MODEL"])
    network = merge_lora.merged_model().build_network(nnx.Rngs(7))  # a base checkpoint, as convert_hf writes them
    merge_lora.write_checkpoint(nnx.to_pure_dict(nnx.state(network, nnx.Param)), str(base))
    gin.clear_config()
    common = ("train.eval_period = 0", "train.checkpoint_period = 2", "train.log_period = 1")
    settings = (*common, "add_adapters.lora = @LoRAConfig()", "LoRAConfig.rank = 4", "constant_schedule.learning_rate = 1e-2",
                f"train.initial_checkpoint_path = '{base}'")
    run_training(run, 2, *settings)
    run_training(run, 4, *settings)  # resumes: the adapters of step 2 go onto the base again
    saved = restore_params(run)  # the newest checkpoint, step 4
    assert saved and all(p.endswith(("/adapter/lora_a", "/adapter/lora_b")) for p in freezing.param_paths(saved))
    bindings = [b for b in settings if "LoRA" in b]
    merge_lora.main(["--gin_file", gin_file, *[f"--gin_binding={b}" for b in bindings], "--checkpoint", str(run),
                     "--out_dir", str(merged)])
    model = merge_lora.merged_model()
    mesh, rules = partitioning.make_mesh({"data": -1}), partitioning.logical_axis_rules()
    graphdef, params = checkpoints.load_checkpoint_params(model, str(run), mesh, rules)
    adapted = nnx.merge(graphdef, params)(TOKENS, TOKENS[:, :5])
    with gin.unlock_config():
        gin.bind_parameter("add_adapters.lora", None)
    plain_graphdef, plain = checkpoints.load_checkpoint_params(model, str(merged), mesh, rules)
    gin.clear_config()
    np.testing.assert_allclose(nnx.merge(plain_graphdef, plain)(TOKENS, TOKENS[:, :5]), adapted, atol=1e-4, rtol=1e-4)


def test_the_tools_say_what_a_lora_config_needs(tmp_path):
    """merge_lora.py without a LoRA config, convert_hf.py --to_hf with one: one `error:` line each, nothing written."""
    import sys

    sys.path.insert(0, str(cli.GIN_CONFIGS_DIR.parent / "tools"))
    import convert_hf
    import merge_lora

    model_gin = str(cli.GIN_CONFIGS_DIR / "models" / "t5_1_1" / "tiny.gin")
    with pytest.raises(SystemExit, match=r"^error: The gin files attach no LoRA \(add_adapters.lora = @LoRAConfig\(\)\); "
                                         "pass the run's gin files.$"):
        merge_lora.main(["--gin_file", model_gin, "--checkpoint", str(tmp_path), "--out_dir", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match=r"^error: The gin files attach adapters \(LoRA\), which a HF model has no place "
                                         r"for; merge them first: tools/merge_lora.py --hf_dir writes the merged model.$"):
        convert_hf.main(["--to_hf", "--gin_file", model_gin, "--gin_binding", "add_adapters.lora = @LoRAConfig()",
                         "--checkpoint", str(tmp_path), "--out_dir", str(tmp_path / "hf")])
    gin.clear_config()
    assert not (tmp_path / "m").exists() and not (tmp_path / "hf").exists()


def test_an_adapter_checkpoint_without_its_base_is_one_clear_error(lora_bound, tmp_path):
    (tmp_path / "checkpoints" / "4" / "state").mkdir(parents=True)  # a run dir whose config.gin is gone
    mesh, rules = partitioning.make_mesh({"data": -1}), partitioning.logical_axis_rules()
    with pytest.raises(cli.UserError) as raised:
        checkpoints.load_checkpoint_params(EncoderDecoderModel(T5_CONFIG), str(tmp_path), mesh, rules)
    assert cli.one_line_error(raised.value) == (
        f"CHECKPOINT_PATH: {tmp_path}/checkpoints/4/state holds adapter parameters only, and {tmp_path}/config.gin "
        "names no INITIAL_CHECKPOINT_PATH (the base model they adapt); point CHECKPOINT_PATH at the checkpoint of an "
        "adapter run with its config.gin."
    )
