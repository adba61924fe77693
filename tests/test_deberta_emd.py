"""DeBERTa's enhanced mask decoder (EMD): off, the network is unchanged; the disentangled attention with separate
query states; the EMD forward against a reference built here from the layer's public call; absolute positions;
training, fine-tuning and export from an EMD checkpoint."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import logging
from flax import nnx

from t5x_lite import checkpoints, hf
from t5x_lite.models.encoder import EncoderClassificationModel, EncoderOnlyMLMModel
from t5x_lite.networks.deberta import Deberta, DebertaConfig
from t5x_lite.nn import disentangled, kernels, layers, stacks
from t5x_lite.training import train_state

VOCAB = 64
# 3 layers (so the EMD reuses the last of them over two below it), 8 buckets < the 16 tokens used.
CONFIG = DebertaConfig(vocab_size=VOCAB, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_layers=3,
                       max_position_embeddings=32, position_buckets=8, kernels="xla")
EMD = dataclasses.replace(CONFIG, enhanced_mask_decoder=True)


@pytest.fixture(scope="module")
def networks() -> dict[str, Deberta]:
    """EMD off and on from one seed; the EMD network's other parameters randomised away from the init."""
    plain = Deberta(CONFIG, rngs=nnx.Rngs(0))
    emd = Deberta(EMD, rngs=nnx.Rngs(0))
    params = nnx.state(emd, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    nnx.update(emd, jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape, p.dtype), params))
    return {"plain": plain, "emd": emd}


def inputs() -> tuple[jax.Array, jax.Array]:
    """Tokens [2, 16] with padding in row 1, and their default positions."""
    tokens = np.random.default_rng(0).integers(3, VOCAB, (2, 16)).astype(np.int32)
    tokens[1, 11:] = 0
    return jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), tokens.shape)


def mask_and_index(tokens: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mask's logit bias and the relative index, as a layer takes them."""
    bias = layers.mask_to_bias(layers.encoder_mask(tokens, None))
    return bias, disentangled.relative_index(positions, CONFIG.relative_span, CONFIG.position_buckets,
                                             CONFIG.max_relative)


def test_emd_off_is_the_plain_encoder_and_on_adds_only_the_table(networks):
    tokens, _ = inputs()
    plain = networks["plain"]
    assert plain.emd_positions is None
    hidden = plain.encode(tokens)
    np.testing.assert_array_equal(plain.mlm_states(tokens), hidden)
    np.testing.assert_array_equal(plain(tokens), plain.mlm_logits(hidden))
    # Same seed: the EMD network's init differs by the added table only.
    fresh = nnx.to_pure_dict(nnx.state(Deberta(EMD, rngs=nnx.Rngs(0)), nnx.Param))
    assert fresh.pop("emd_positions")["embedding"].shape == (EMD.max_position_embeddings, EMD.d_model)
    jax.tree.map(np.testing.assert_array_equal, fresh, nnx.to_pure_dict(nnx.state(plain, nnx.Param)))


@pytest.mark.parametrize("share_att_key", [True, False])
def test_query_states_equal_to_the_keys_give_the_plain_attention(share_att_key):
    attention = disentangled.DisentangledSelfAttention(
        32, 4, 8, pos_att_type=("p2c", "c2p"), share_att_key=share_att_key, kernels=kernels.resolve("xla"),
        rngs=nnx.Rngs(0))
    tokens, positions = inputs()
    x = jax.random.normal(jax.random.key(2), (*tokens.shape, 32))
    bias, index = mask_and_index(tokens, positions)
    table = jax.random.normal(jax.random.key(3), (16, 32))
    plain = attention(x, bias, index, table)
    np.testing.assert_array_equal(attention(x, bias, index, table, query_states=x), plain)
    other = attention(x, bias, index, table, query_states=x[:, ::-1])
    assert np.abs(np.asarray(other - plain)).max() > 1e-3


def test_emd_forward_matches_a_reference_from_the_last_layer(networks):
    """H = the last layer's input; I = H + positions; I <- last layer(keys/values H, queries I), twice; MLM head."""
    network = networks["emd"]
    tokens, positions = inputs()
    args = (*mask_and_index(tokens, positions), network.relative_table(None))
    _, states = network.encode(tokens, return_hidden_states=True)
    last = network.layers[-1]
    query = states[-2] + network.emd_positions.embedding[...][positions]
    for _ in range(2):
        query = last(states[-2], *args, None, query_states=query)
    expected = np.asarray(network.mlm_logits(query))
    np.testing.assert_allclose(network(tokens), expected, atol=1e-5, rtol=1e-5)
    assert np.abs(expected - np.asarray(network.mlm_logits(states[-1]))).max() > 1e-2  # not the last layer's output
    # The scanned layout (stacked params, the last layer sliced off) gives the same logits.
    scanned = Deberta(dataclasses.replace(EMD, scan_layers=True), rngs=nnx.Rngs(0))
    nnx.update(scanned, stacks.stack_layer_params(nnx.to_pure_dict(nnx.state(network, nnx.Param))))
    np.testing.assert_allclose(scanned(tokens), expected, atol=1e-5, rtol=1e-5)


def test_absolute_positions_change_the_mlm_logits_only_with_emd(networks):
    """Shifting every position keeps the relative distances: only the EMD's absolute table sees it."""
    tokens, positions = inputs()
    for name, changes in (("plain", False), ("emd", True)):
        network = networks[name]
        moved = np.abs(np.asarray(network(tokens, positions=positions + 7) - network(tokens, positions=positions)))
        assert (moved.max() > 1e-3) == changes, name


def test_mlm_training_reads_the_emd_and_classification_from_its_checkpoint_drops_the_table(networks, tmp_path):
    network = networks["emd"]
    tokens, _ = inputs()
    targets = jnp.where(jnp.arange(16) % 4 == 1, tokens, 0)
    batch = {"encoder_input_tokens": tokens, "encoder_target_tokens": targets, "encoder_loss_weights": targets > 0}
    model = EncoderOnlyMLMModel(EMD)
    loss, grads = nnx.value_and_grad(lambda net: model.loss_fn(net, batch)[0])(network)
    logits = network(tokens)
    expected = -jax.nn.log_softmax(logits)[targets > 0, targets[targets > 0]].mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert float(jnp.abs(grads.emd_positions.embedding[...]).sum()) > 0

    params = nnx.to_pure_dict(nnx.state(network, nnx.Param))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "pretrained" / "state", {"params": params})
    classify = EncoderClassificationModel(EMD)
    _, abstract = train_state.network_graphdef(classify)
    fresh = nnx.to_pure_dict(nnx.state(classify.build_network(nnx.Rngs(0)), nnx.Param))
    restored = checkpoints.restore_params(str(tmp_path / "pretrained"), nnx.to_pure_dict(abstract), classify, fresh)
    assert "emd_positions" not in restored
    encoder = {k: v for k, v in params.items() if k not in ("emd_positions", "mlm")}
    jax.tree.map(np.testing.assert_array_equal, {k: restored[k] for k in encoder}, encoder)
    classifier = classify.build_network(nnx.Rngs(0))
    nnx.update(classifier, restored)
    np.testing.assert_array_equal(classifier.encode(tokens), network.encode(tokens))


def test_export_leaves_out_the_table_and_an_emd_run_from_it_starts_one(networks, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    network = networks["emd"]
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda message, *args: warnings.append(message % args))
    hf.save_pretrained(network, tmp_path / "exported")
    assert len(warnings) == 1 and "leaves out its absolute-position table (emd_positions)" in warnings[0]
    reloaded = transformers.DebertaV2ForMaskedLM.from_pretrained(tmp_path / "exported").eval()
    tokens, _ = inputs()
    with torch.no_grad():
        theirs = reloaded(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long),
                          attention_mask=torch.tensor(np.asarray(tokens) > 0)).logits.numpy()
    real = np.asarray(tokens) > 0
    ours = np.asarray(network.mlm_logits(network.encode(tokens)))
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    # An EMD run started from the export (`hf:`) restores the rest and starts the table fresh.
    model = EncoderOnlyMLMModel(EMD)
    _, abstract = train_state.network_graphdef(model)
    fresh = nnx.to_pure_dict(nnx.state(model.build_network(nnx.Rngs(5)), nnx.Param))
    restored = checkpoints.restore_params(f"hf:{tmp_path / 'exported'}", nnx.to_pure_dict(abstract), model, fresh)
    np.testing.assert_array_equal(restored["emd_positions"]["embedding"], fresh["emd_positions"]["embedding"])
    params = nnx.to_pure_dict(nnx.state(network, nnx.Param))
    jax.tree.map(np.testing.assert_allclose, {k: v for k, v in restored.items() if k != "emd_positions"},
                 {k: v for k, v in params.items() if k != "emd_positions"})


@pytest.mark.slow
def test_emd_steps_below_one_is_one_error_line(tmp_path):
    """A config check raised while gin builds MODEL: one `error:` line, no run folder made."""
    from tests.test_cli import run_cli
    from tests.test_safety import assert_one_error

    result = run_cli("--gin_file=gin_configs/examples/deberta_tiny_pretrain.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                     "--gin.DebertaConfig.enhanced_mask_decoder=True", "--gin.DebertaConfig.emd_steps=0")
    assert_one_error(result, "DebertaConfig.emd_steps=0 must be a positive integer.")
    assert not (tmp_path / "run").exists()
