"""The GPT-2-style decoder-only model: HF parity, cached decoding, causal and prefix-LM masks, training."""

from __future__ import annotations

import dataclasses
import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from flax import nnx

import t5x_lite.tasks  # noqa: F401  (registers the bundled tasks read below)
from t5x_lite import cli, evaluation, partitioning
from t5x_lite import train as train_lib
from t5x_lite.decoding import DecodeConfig
from t5x_lite.hf import gpt2 as hf_gpt2
from t5x_lite.models.causal import DecoderOnlyModel, PrefixLMModel
from t5x_lite.networks.gpt import GPT, GPTConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

TINY = GPTConfig(
    vocab_size=97, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_layers=2, max_position_embeddings=40
)
NO_EOS = -1  # an id no decoder emits: decode the full length


def random_hf_gpt2(config: GPTConfig = TINY) -> transformers.GPT2LMHeadModel:
    """A tiny GPT2LMHeadModel with every parameter random (biases and norms too, so the mapping is checked)."""
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.max_position_embeddings, n_embd=config.d_model,
        n_layer=config.num_layers, n_head=config.num_heads, n_inner=config.d_ff, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=config.layer_norm_epsilon,
        bos_token_id=0, eos_token_id=1, pad_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.2)
    return hf


def load(network: nnx.Module, params: dict) -> None:
    state = nnx.state(network, nnx.Param)
    assert jax.tree.structure(nnx.to_pure_dict(state)) == jax.tree.structure(params)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(network, state)


def network_from_hf(hf: transformers.GPT2LMHeadModel, config: GPTConfig = TINY) -> GPT:
    network = GPT(config, rngs=nnx.Rngs(1))
    load(network, hf_gpt2.params_from_hf(hf.state_dict(), hf.config.to_dict(), config))
    return network


@pytest.fixture(scope="module")
def hf_and_ours():
    hf = random_hf_gpt2()
    return hf, network_from_hf(hf)


def test_logits_match_hf_with_right_and_left_padding(hf_and_ours):
    hf, network = hf_and_ours
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, TINY.vocab_size, (3, 12))
    lengths = np.array([12, 7, 3])
    real = np.arange(12)[None] < lengths[:, None]

    # Right padding: unpacked rows need no mask (causal attention never reaches the tail).
    right = np.where(real, tokens, 0)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(right), attention_mask=torch.tensor(real.astype(np.int64))).logits.numpy()
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(network, jnp.asarray(right)))
    diff = np.abs(logits - expected)[real].max()
    print(f"right padding: max |logits - HF| = {diff:.2e} (max |logit| {np.abs(expected).max():.1f})")
    assert diff < 1e-4

    # Left padding: segment id 0 masks the padding, positions start at each row's first token.
    shift = 12 - lengths
    left = np.stack([np.roll(row, s) for row, s in zip(right, shift)])
    mask = np.stack([np.roll(row, s) for row, s in zip(real, shift)])
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        expected = hf(
            input_ids=torch.tensor(left), attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    logits = np.asarray(network(jnp.asarray(left), jnp.asarray(mask.astype(np.int32)), jnp.asarray(positions)))
    assert np.abs(logits - expected)[mask].max() < 1e-4


def test_hf_mapping_round_trips_and_rejects_mismatches(hf_and_ours):
    hf, network = hf_and_ours
    state_dict = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = hf_gpt2.params_to_hf(nnx.to_pure_dict(nnx.state(network, nnx.Param)), TINY)
    assert set(back) == set(state_dict) - {"lm_head.weight"}
    for name, value in back.items():
        np.testing.assert_array_equal(value, state_dict[name], err_msg=name)

    # GPT2Model names (no `transformer.` prefix) import too; a padded vocabulary gets zero rows.
    bare = {k.removeprefix("transformer."): v for k, v in state_dict.items() if k != "lm_head.weight"}
    padded = dataclasses.replace(TINY, vocab_size=128)
    params = hf_gpt2.params_from_hf(bare, {}, padded)
    assert params["token_embedder"]["embedding"].shape == (128, TINY.d_model)
    assert not params["token_embedder"]["embedding"][TINY.vocab_size:].any()

    with pytest.raises(ValueError, match="no tensor 'h.1.ln_1.weight'"):
        hf_gpt2.params_from_hf({k: v for k, v in bare.items() if k != "h.1.ln_1.weight"}, {}, TINY)
    with pytest.raises(ValueError, match="tensors a GPT2LMHeadModel with 1 layers does not"):
        hf_gpt2.params_from_hf(bare, {}, dataclasses.replace(TINY, num_layers=1))
    with pytest.raises(ValueError, match=r"wpe.weight.*shape \(40, 32\).*needs \(64, 32\)"):
        hf_gpt2.params_from_hf(bare, {}, dataclasses.replace(TINY, max_position_embeddings=64))


def prompt_batch(prompts: list[list[int]], width: int) -> dict[str, jax.Array]:
    """Right-padded decoder inputs with the prompt marked by `decoder_causal_attention` (PrefixLM layout)."""
    tokens = np.zeros((len(prompts), width), np.int32)
    causal = np.zeros((len(prompts), width), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = prompt
        causal[i, : len(prompt)] = 1
    return {"decoder_input_tokens": jnp.asarray(tokens), "decoder_causal_attention": jnp.asarray(causal)}


@nnx.jit
def forward(network: GPT, tokens: jax.Array, causal_attention: jax.Array | None = None,
            segment_ids: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
    return network(tokens, segment_ids, positions, causal_attention)


def uncached_greedy(network: GPT, prompt: list[int], steps: int, prefix_lm: bool) -> list[int]:
    """Greedy decoding by re-running the whole sequence for every new token (no cache). The sequence is
    zero-padded to a fixed width (one compilation); causal attention never sees the padding."""
    width = len(prompt) + steps
    sequence = np.zeros((1, width), np.int32)
    sequence[0, : len(prompt)] = prompt
    causal = jnp.asarray(np.arange(width)[None] < len(prompt), jnp.int32) if prefix_lm else None
    for t in range(len(prompt), width):
        logits = forward(network, jnp.asarray(sequence), causal)
        sequence[0, t] = int(jnp.argmax(logits[0, t - 1]))
    return sequence[0, len(prompt):].tolist()


PROMPTS = [[0, 5, 17, 33, 8, 61, 2], [0, 44], [0, 9, 9, 70, 3]]


def test_cached_greedy_equals_uncached_and_hf_generate(hf_and_ours):
    hf, network = hf_and_ours
    steps = 9
    model = DecoderOnlyModel(TINY)
    predict = nnx.jit(lambda m, b: model.predict_batch(m, b, max_decode_length=steps, decode=DecodeConfig(eos_id=NO_EOS)))
    cached = np.asarray(predict(network, prompt_batch(PROMPTS, width=10)))

    uncached = [uncached_greedy(network, prompt, steps, prefix_lm=False) for prompt in PROMPTS]
    np.testing.assert_array_equal(cached, uncached)

    width = max(map(len, PROMPTS))  # HF batches prompts left-padded
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        generated = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, num_beams=1,
            eos_token_id=None, pad_token_id=0,
        )
    np.testing.assert_array_equal(cached, generated[:, width:].numpy())


def test_prefix_lm_cached_decoding_equals_uncached_and_ignores_targets(hf_and_ours):
    _, network = hf_and_ours
    steps = 6
    model = PrefixLMModel(TINY)
    batch = prompt_batch(PROMPTS, width=12)
    # The evaluator's batch also holds the targets after the prompt: predict_features removes them.
    with_targets = np.array(batch["decoder_input_tokens"])
    with_targets[:, 7:] = 50
    features = model.predict_features({**batch, "decoder_input_tokens": with_targets})
    np.testing.assert_array_equal(features["decoder_input_tokens"], batch["decoder_input_tokens"])

    for method in ("greedy", "beam"):
        predict = nnx.jit(lambda m, b, method=method: model.predict_batch(
            m, b, max_decode_length=steps, decode=DecodeConfig(method=method, beam_size=1, eos_id=NO_EOS)))
        cached = np.asarray(predict(network, features))
        uncached = [uncached_greedy(network, prompt, steps, prefix_lm=True) for prompt in PROMPTS]
        np.testing.assert_array_equal(cached, uncached, err_msg=method)
    # Bidirectional attention over the prompt changes the continuation (else the test could not fail).
    causal = [uncached_greedy(network, prompt, steps, prefix_lm=False) for prompt in PROMPTS]
    assert causal != uncached


def per_position_change(network: GPT, tokens: np.ndarray, position: int, causal: jax.Array | None = None) -> np.ndarray:
    """max |logit change| at each position when the token at `position` changes."""
    changed = tokens.copy()
    changed[0, position] = (changed[0, position] + 1) % TINY.vocab_size
    a = forward(network, jnp.asarray(tokens), causal)
    b = forward(network, jnp.asarray(changed), causal)
    return np.asarray(jnp.abs(a - b).max(axis=-1))[0]


def test_causal_model_never_looks_ahead(hf_and_ours):
    _, network = hf_and_ours
    tokens = np.random.default_rng(1).integers(2, TINY.vocab_size, (1, 16))
    for position in (3, 9, 15):
        change = per_position_change(network, tokens, position)
        assert change[:position].max() == 0.0
        assert change[position:].min() > 1e-3


def test_prefix_lm_mask_is_bidirectional_over_inputs_only(hf_and_ours):
    _, network = hf_and_ours
    tokens = np.random.default_rng(2).integers(2, TINY.vocab_size, (1, 16))
    causal = jnp.asarray([[1] * 7 + [0] * 9])  # inputs: positions 0..6
    # A later input token changes earlier input positions (and everything after it).
    change = per_position_change(network, tokens, 5, causal)
    assert change[:5].min() > 1e-3 and change[5:].min() > 1e-3
    # A target token never changes earlier positions.
    for position in (7, 11):
        change = per_position_change(network, tokens, position, causal)
        assert change[:position].max() == 0.0
        assert change[position:].min() > 1e-3


def test_packed_segments_do_not_interact(hf_and_ours):
    _, network = hf_and_ours
    rng = np.random.default_rng(3)
    a, b = rng.integers(2, TINY.vocab_size, 6), rng.integers(2, TINY.vocab_size, 5)
    packed = np.concatenate([a, b, [0]])[None]
    segments = np.array([[1] * 6 + [2] * 5 + [0]])
    positions = np.array([list(range(6)) + list(range(5)) + [0]])
    causal = np.array([[1] * 3 + [0] * 3 + [1] * 2 + [0] * 3 + [0]])
    logits = forward(network, jnp.asarray(packed), jnp.asarray(causal), jnp.asarray(segments), jnp.asarray(positions))
    alone_a = forward(network, jnp.asarray(a[None]), jnp.asarray(causal[:, :6]))
    alone_b = forward(network, jnp.asarray(b[None]), jnp.asarray(causal[:, 6:11]))
    np.testing.assert_allclose(logits[0, :6], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(logits[0, 6:11], alone_b[0], atol=1e-5)


def test_loss_on_targets_only_and_score(hf_and_ours):
    """The PrefixLM converter's batch: loss and score count the targets part only."""
    _, network = hf_and_ours
    ds = seqio.PrefixLMFeatureConverter(pack=False)(
        _dataset([{"inputs": [7, 8, 5, 1], "targets": [3, 9, 1]}]), {"inputs": 6, "targets": 4}
    )
    batch = {k: jnp.asarray(v)[None] for k, v in next(ds.as_numpy_iterator()).items()}
    np.testing.assert_array_equal(batch["decoder_loss_weights"][0], [0, 0, 0, 0, 1, 1, 1, 0, 0, 0])
    model = PrefixLMModel(TINY)
    loss, sums = nnx.jit(model.loss_fn)(network, batch)
    logits = forward(network, batch["decoder_input_tokens"], batch["decoder_causal_attention"])
    log_probs = jax.nn.log_softmax(logits, axis=-1)[0]
    expected = -sum(float(log_probs[t, tok]) for t, tok in ((4, 3), (5, 9), (6, 1)))
    np.testing.assert_allclose(float(sums["loss_sum"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), expected / 3, rtol=1e-5)
    np.testing.assert_allclose(float(nnx.jit(model.score_batch)(network, batch)[0]), -expected, rtol=1e-5)


def _dataset(examples: list[dict[str, list[int]]]) -> tf.data.Dataset:
    return tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature={k: tf.TensorSpec([None], tf.int32) for k in examples[0]},
    )


def test_config_errors():
    with pytest.raises(ValueError, match="GPTConfig.activation='swish'"):
        GPTConfig(activation="swish")
    with pytest.raises(ValueError, match="GPTConfig.dtype='float33'"):
        GPTConfig(dtype="float33")
    with pytest.raises(ValueError, match="exceeds the model's 40 learned positions"):
        GPT(TINY, rngs=nnx.Rngs(0))(jnp.zeros((1, 41), jnp.int32))


def test_model_runner_predicts_and_scores_a_text_to_text_task():
    """Eval plumbing: the evaluator's prefix-LM batches reach predict_batch without their targets."""
    model = PrefixLMModel(dataclasses.replace(TINY, vocab_size=8192, max_position_embeddings=128))
    network = model.build_network(nnx.Rngs(0))
    graphdef, params = nnx.split(network, nnx.Param)
    mesh = partitioning.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rules = partitioning.logical_axis_rules()
    evaluator = evaluation.make_evaluator(
        "bundled_qa_yes_no", {"inputs": 32, "targets": 4}, model.feature_converter_cls, num_examples=4
    )
    runner = evaluation.ModelRunner(model, graphdef, mesh, rules, batch_size=8)
    seen = []
    real_predict = model.predict_batch
    model.predict_batch = lambda network, batch, **kw: seen.append(sorted(batch)) or real_predict(network, batch, **kw)
    metrics, outputs = evaluation.evaluate(evaluator, runner, params, max_decode_length=4)
    assert seen == [["decoder_causal_attention", "decoder_input_tokens"]]
    assert 0.0 <= metrics["eval/bundled_qa_yes_no/accuracy"] <= 100.0
    predictions = outputs["bundled_qa_yes_no"][seqio.evaluation.ModelOutputType.PREDICTION]
    assert len(predictions) == 4


def test_model_runner_stops_decoding_at_its_eos_id():
    """eval/infer pass the targets vocabulary's EOS (e.g. 2 for BART's tokenizer) down to decoding."""
    model = DecoderOnlyModel(dataclasses.replace(TINY, vocab_size=64))
    graphdef, params = nnx.split(model.build_network(nnx.Rngs(0)), nnx.Param)
    mesh = partitioning.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rules = partitioning.logical_axis_rules()
    examples = tf.data.Dataset.from_tensor_slices({"decoder_input_tokens": np.full((4, 6), 5, np.int32)})
    features = examples.enumerate()

    def predict(eos_id):
        runner = evaluation.ModelRunner(model, graphdef, mesh, rules, batch_size=8, eos_id=eos_id)
        return [tokens for _, tokens in runner.predict(params, features, max_decode_length=8)]

    unconstrained = predict(eos_id=-1)  # never produced: every row runs to the full length
    assert all(len(row) == 8 and 0 not in row for row in unconstrained)
    eos = unconstrained[0][2]  # a token the model emits mid-sequence
    for free, stopped in zip(unconstrained, predict(eos_id=eos)):
        end = free.index(eos) + 1 if eos in free else len(free)
        assert stopped == free[:end] + [0] * (len(free) - end)
    assert evaluation.targets_eos_id(seqio.get_mixture_or_task("bundled_qa_yes_no")) == 1


# ------------------------------------------------------------------ gin files and training through t5x_lite.train


@gin.configurable("test_decoder_only_model")
def model_from_gin(model=gin.REQUIRED):
    return model


@pytest.mark.parametrize("size,params", [("tiny", 1.5e6), ("small", 124.5e6), ("medium", 354.9e6)])
def test_model_gin_files(size, params):
    gin.clear_config()
    cli.parse_gin(["runs/pretrain.gin", f"models/gpt/{size}.gin"], ["test_decoder_only_model.model = %MODEL"])
    model = model_from_gin()
    gin.clear_config()
    assert isinstance(model, DecoderOnlyModel)
    network = nnx.eval_shape(lambda: model.build_network(nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(network, nnx.Param)))
    assert abs(count - params) < 0.01 * params, count


def run_train(files: list[str], model_dir, *bindings: str) -> dict[str, float]:
    gin.clear_config()
    cli.parse_gin(
        files,
        [f"MODEL_DIR = '{model_dir}'", "BATCH_SIZE = 8", "train.log_period = 10", "train.checkpoint_period = 1000",
         "train.progress_bar = False", *bindings],
    )
    cli.require_macros()
    try:
        return train_lib.train()
    finally:
        gin.clear_config()


def train_losses(model_dir) -> list[float]:
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.mark.slow
def test_gpt_pretrains_then_finetunes_as_prefix_lm_on_a_text_to_text_task(tmp_path):
    pretrained = tmp_path / "gpt"
    run_train(["examples/gpt_tiny_pretrain.gin"], pretrained, "TRAIN_STEPS = 30", "train.eval_period = 0",
              "TASK_FEATURE_LENGTHS = {'targets': 64}")
    losses = train_losses(pretrained)
    print("gpt", [f"{x:.3f}" for x in losses])
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5

    # The causal LM's checkpoint initialises a prefix-LM fine-tune, evaluated by decoding.
    summary = run_train(
        ["runs/finetune.gin", "models/gpt/tiny.gin"], tmp_path / "qa", "MODEL = @PrefixLMModel()",
        f"INITIAL_CHECKPOINT_PATH = '{pretrained}'", "MIXTURE_OR_TASK_NAME = 'bundled_qa_yes_no'",
        "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 4}", "TRAIN_STEPS = 4", "train.eval_period = 4",
        "train.eval_steps = 1", "make_evaluator.num_examples = 8",
    )
    assert np.isfinite(summary["eval/loss"])
    assert 0.0 <= summary["eval/bundled_qa_yes_no/accuracy"] <= 100.0


@pytest.mark.slow
def test_prefix_lm_loss_falls_on_the_bundled_corpus(tmp_path):
    run_train(["examples/prefix_lm_tiny_pretrain.gin"], tmp_path / "run", "TRAIN_STEPS = 30", "train.eval_period = 0",
              "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 32}")
    losses = train_losses(tmp_path / "run")
    print("prefix_lm", [f"{x:.3f}" for x in losses])
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5


def test_bfloat16_train_step_executes_and_matches_float32():
    """bf16 activations: forward and backward run (XLA CPU rejects some bf16 dot layouts only at run time)."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(2, TINY.vocab_size, (2, 16))
    batch = {
        "decoder_input_tokens": jnp.asarray(np.pad(tokens[:, :-1], ((0, 0), (1, 0)))),
        "decoder_target_tokens": jnp.asarray(tokens),
        "decoder_loss_weights": jnp.ones((2, 16), jnp.int32),
        "decoder_causal_attention": jnp.asarray(np.arange(16)[None].repeat(2, 0) < 6, jnp.int32),
    }
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = PrefixLMModel(dataclasses.replace(TINY, num_layers=1, dtype=dtype, dropout_rate=0.1))
        network = model.build_network(nnx.Rngs(0))
        step = nnx.jit(lambda m, b, model=model: nnx.value_and_grad(lambda m: model.loss_fn(m, b, nnx.Rngs(dropout=1))[0])(m))
        loss, grads = step(network, batch)
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
        losses[dtype] = float(loss)
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)
