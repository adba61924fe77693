"""AANG's objective space: the combinations and their rules, each T/O and R on hand examples, the reading orders in
T5's encoder, the feature converter, and the factored weights."""

import dataclasses
import json
import shutil

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from flax import nnx

from t5x_lite import cli
from t5x_lite.data import feature_converters, objective_stages, special_tokens, vocab
from t5x_lite.data.objective_stages import Combination
from t5x_lite.data.preprocessors import objective_space
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5, T5Config
from t5x_lite.nn import layers
from t5x_lite.training import loop
from t5x_lite.training.end_task_aware import EndTaskAware
from t5x_lite.training.factored_weights import FactoredWeighting, stage_options
from tests.test_cli import run_cli

TINY = T5Config(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=2,
                num_decoder_layers=1)
TOKENS = tf.range(10, 30, dtype=tf.int32)  # 20 ordinary pieces
SEEDS = [tf.constant([s, 7]) for s in range(8)]


@pytest.fixture(scope="module")
def vocabulary():
    return vocab.get_vocabulary()


# ------------------------------------------------------------------ the space and its rules


def test_the_product_minus_the_rules():
    every = objective_stages.combinations()
    assert len(every) == 57  # of 3 x 4 x 4 x 3 = 144
    names = {c.name for c in every}
    assert {"task_mask_bi_denoise", "general_none_l2r_next", "general_span_bi_denoise", "domain_replace_r2l_next",
            "task_none_rand_task", "general_mask_rand_denoise"} <= names
    excluded = {
        "general_none_bi_denoise": 2,  # nothing to denoise
        "general_mask_bi_next": 3,  # next token without a reading direction
        "task_none_rand_next": 3,
        "domain_none_l2r_task": 0,  # the task's output of other text
        "task_mask_l2r_task": 0,
        "task_none_bi_task": 1,  # the end task itself
        "task_span_l2r_next": 4,  # sentinels nobody names
    }
    for name, rule in excluded.items():
        assert name not in names
        assert objective_stages.exclusion_reason(Combination(*name.split("_"))) == objective_stages.RULES[rule]
    subset = objective_stages.combinations(data=["task"], transforms=["none", "mask"], outputs=["denoise", "task"])
    assert [c.name for c in subset] == ["task_none_l2r_task", "task_none_r2l_task", "task_none_rand_task",
                                        "task_mask_bi_denoise", "task_mask_l2r_denoise", "task_mask_r2l_denoise",
                                        "task_mask_rand_denoise"]
    with pytest.raises(ValueError, match="the transform options"):
        objective_stages.combinations(transforms=["mask", "shuffle"])


# ------------------------------------------------------------------ T and O on a hand example


def _example(name, seed, vocabulary, budgets=(12, 12)):
    inputs, targets = objective_space.make_example(TOKENS, Combination(*name.split("_")), seed, vocabulary, *budgets)
    return inputs.numpy().tolist(), targets.numpy().tolist()


def test_next_token_splits_in_the_reading_direction(vocabulary):
    tokens = TOKENS.numpy().tolist()
    for seed in SEEDS:
        inputs, targets = _example("general_none_l2r_next", seed, vocabulary, (12, 10))
        assert inputs + targets == tokens and len(inputs) <= 12 and len(targets) <= 10
        inputs, targets = _example("general_none_r2l_next", seed, vocabulary, (12, 10))
        assert targets[::-1] + inputs == tokens and len(inputs) <= 12 and len(targets) <= 10


def test_mask_and_replace_corrupt_15_percent_and_denoise_to_the_original(vocabulary):
    tokens = TOKENS.numpy()
    mask_id = special_tokens.bert_special_ids(vocabulary).mask
    low, high = special_tokens.ordinary_id_range(vocabulary)
    assert int(tf.reduce_sum(tf.cast(objective_space.choose_positions(20, SEEDS[0]), tf.int32))) == 3
    kinds = {"mask": 0, "random": 0}
    for seed in SEEDS:
        for transform in ("mask", "replace"):
            inputs, targets = _example(f"task_{transform}_bi_denoise", seed, vocabulary)
            assert targets == tokens.tolist()
            changed = [i for i, t in zip(inputs, tokens) if i != t]
            assert len(changed) <= 3
            assert all(i == mask_id or low <= i < high for i in changed)
            if transform == "mask":
                kinds["mask"] += sum(i == mask_id for i in changed)
            else:
                assert mask_id not in inputs
    assert kinds["mask"] >= 12  # of 24 chosen, ~80% [MASK]
    inputs, _ = _example("task_mask_l2r_next", SEEDS[0], vocabulary)  # the transform reads only the inputs
    assert len(inputs) <= 12


def test_span_corruption_is_t5s(vocabulary):
    inputs, targets = _example("general_span_bi_denoise", SEEDS[0], vocabulary)
    sentinel = vocabulary.vocab_size - 1
    assert sentinel in inputs and targets[0] == sentinel
    kept = [t for t in inputs if t < vocabulary.vocab_size - 100]
    hidden = [t for t in targets if t < vocabulary.vocab_size - 100]
    assert sorted(kept + hidden) == TOKENS.numpy().tolist()


def test_reading_orders():
    seed = tf.constant([3, 4])
    rank = {r: objective_space.attention_rank(5, r, seed).numpy().tolist() for r in objective_stages.REPRESENTATIONS}
    assert rank["bi"] == [0] * 5 and rank["l2r"] == [0, 1, 2, 3, 4] and rank["r2l"] == [4, 3, 2, 1, 0]
    assert sorted(rank["rand"]) == [0, 1, 2, 3, 4]
    assert objective_space.attention_rank(5, "rand", seed).numpy().tolist() == rank["rand"]  # seeded


def test_tasks_read_the_end_task_and_carry_the_order():
    import t5x_lite.tasks  # noqa: F401

    lengths = {"inputs": 48, "targets": 16}
    end = next(seqio.get_mixture_or_task("bundled_qa_extractive").get_dataset(lengths, shuffle=False).as_numpy_iterator())
    task = next(seqio.get_mixture_or_task("aang_task_none_l2r_task").get_dataset(lengths, shuffle=False)
                .as_numpy_iterator())
    assert task["inputs"].tolist() == end["inputs"].tolist() and task["targets"].tolist() == end["targets"].tolist()
    assert task["attention_rank"].tolist() == list(range(48)) and task["representation"] == 1
    general = next(seqio.get_mixture_or_task("aang_general_none_r2l_next").get_dataset(lengths, shuffle=False)
                   .as_numpy_iterator())
    assert len(general["inputs"]) + len(general["targets"]) == 48 + 16  # the chunk fills both lengths
    assert general["attention_rank"].tolist() == list(range(len(general["inputs"]) - 1, -1, -1))


def test_feature_converter_carries_the_order_and_zeros_without_it():
    ranked = tf.data.Dataset.from_tensors({"inputs": [5, 6, 1], "targets": [7, 1], "attention_rank": [2, 1, 0]})
    plain = tf.data.Dataset.from_tensors({"inputs": [5, 6, 1], "targets": [7, 1]})
    lengths = {"inputs": 4, "targets": 3}
    for pack in (False, True):
        converter = feature_converters.RankedEncDecFeatureConverter(pack=pack)
        row = next(converter(ranked, lengths).as_numpy_iterator())
        assert row["encoder_attention_rank"].tolist() == [2, 1, 0, 0]
        assert row["encoder_input_tokens"].tolist() == [5, 6, 1, 0]
        assert next(converter(plain, lengths).as_numpy_iterator())["encoder_attention_rank"].tolist() == [0] * 4


# ------------------------------------------------------------------ R in T5's encoder


def test_order_masks_equal_hand_written_masks():
    rank = jnp.array([[0, 0, 0], [0, 1, 2], [2, 1, 0], [1, 2, 0]])
    expected = [
        [[1, 1, 1], [1, 1, 1], [1, 1, 1]],  # bidirectional
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]],  # left to right
        [[1, 1, 1], [0, 1, 1], [0, 0, 1]],  # right to left
        [[1, 0, 1], [1, 1, 1], [0, 0, 1]],  # order 2, 0, 1: position 0 sees 2 and itself
    ]
    np.testing.assert_array_equal(layers.order_mask(rank)[:, 0], np.array(expected, bool))


@pytest.mark.parametrize("scan,kernels", [(False, "xla"), (True, "cpu_tuned")])
def test_left_to_right_encoder_equals_a_causal_mask(scan, kernels):
    network = T5(dataclasses.replace(TINY, scan_layers=scan, kernels=kernels), rngs=nnx.Rngs(0))
    tokens = jnp.array([[5, 9, 3, 7, 1, 0], [4, 4, 8, 1, 0, 0]])
    rank = jnp.broadcast_to(jnp.arange(6), tokens.shape)
    causal = layers.encoder_mask(tokens, None) & layers.causal_mask(6)
    reference = network._encoder_stack(tokens, jnp.arange(6)[None], causal, None)
    np.testing.assert_allclose(network.encode(tokens, encoder_attention_rank=rank), reference, atol=1e-6)
    reversed_rank = 5 - rank
    anti = layers.encoder_mask(tokens, None) & layers.causal_mask(6).transpose(0, 1, 3, 2)
    np.testing.assert_allclose(network.encode(tokens, encoder_attention_rank=reversed_rank),
                               network._encoder_stack(tokens, jnp.arange(6)[None], anti, None), atol=1e-6)


def test_without_the_feature_the_program_and_logits_are_unchanged():
    network = T5(TINY, rngs=nnx.Rngs(0))
    tokens, decoder = jnp.array([[5, 9, 3, 1, 0]]), jnp.array([[0, 6, 2]])

    def today(tokens):  # the encoder as it was before the feature existed
        mask = layers.encoder_mask(tokens, None)
        return network._encoder_stack(tokens, jnp.arange(5)[None], mask, None)

    assert str(jax.make_jaxpr(network.encode)(tokens)) == str(jax.make_jaxpr(today)(tokens))
    model = EncoderDecoderModel(TINY)
    batch = {"encoder_input_tokens": tokens, "decoder_input_tokens": decoder}
    plain = model.network_logits(network, batch, None)
    np.testing.assert_array_equal(plain, network(tokens, decoder))
    zeros = model.network_logits(network, {**batch, "encoder_attention_rank": jnp.zeros_like(tokens)}, None)
    np.testing.assert_array_equal(zeros, plain)  # all-zero ranks: bidirectional
    ordered = model.network_logits(network, {**batch, "encoder_attention_rank": jnp.arange(5)[None]}, None)
    assert not np.allclose(ordered, plain)


# ------------------------------------------------------------------ factored weights

NAMES = ["bundled_qa_extractive", "aang_task_mask_bi_denoise", "aang_task_replace_bi_denoise",
         "aang_general_mask_bi_denoise", "aang_task_span_bi_denoise"]


def _option(stage, option):
    return stage_options().index((stage, option))


def test_combination_weight_is_the_hand_formula():
    method = FactoredWeighting()
    state = method.init(NAMES)
    state["logits"] = jnp.array([0.5, 0.1, -0.2, 0.3, 0.0])
    state["stage_logits"] = state["stage_logits"].at[_option("data", "task")].set(0.7).at[
        _option("transform", "mask")].set(-0.4).at[_option("output", "denoise")].set(0.2)
    scores = [0.5, 0.1 + 0.7 - 0.4 + 0.2, -0.2 + 0.7 + 0.2, 0.3 - 0.4 + 0.2, 0.0 + 0.7 + 0.2]
    expected = np.exp(scores) / np.sum(np.exp(scores))
    np.testing.assert_allclose(method.weights(state), expected, rtol=1e-6)


def test_a_stage_option_shared_by_aligned_combinations_rises():
    method = FactoredWeighting(meta_lr=0.5)
    state = method.init(NAMES)
    before = method.full_weights(state)
    state = method.update(state, jnp.array([0.0, 1.0, 1.0, -1.0, 0.0]), jnp.zeros(5))
    after = method.full_weights(state)
    assert state["stage_logits"][_option("data", "task")] == pytest.approx(1.0)  # 0.5 x (1 + 1 + 0)
    assert state["stage_logits"][_option("data", "general")] == pytest.approx(-0.5)
    # task_span had no signal of its own: the shared D=task lifts it against the end task (no options, no signal).
    assert after[4] / after[0] > before[4] / before[0]
    assert after[3] < after[4] < after[1]


def test_sampling_is_deterministic_per_seed_and_step():
    method, again = FactoredWeighting(k=2, seed=3), FactoredWeighting(k=2, seed=3)
    state = method.init(NAMES)
    again.init(NAMES)
    masks = []
    for _ in range(8):
        weights = method.weights(state)
        np.testing.assert_array_equal(weights, again.weights(state))
        mask = np.asarray(method.sampled(state))
        assert mask[0] and mask[1:].sum() == 2  # the end task always, K combinations
        assert float(weights.sum()) == pytest.approx(1.0) and np.all(np.asarray(weights)[~mask] == 0)
        masks.append(tuple(mask))
        state = method.update(state, jnp.zeros(len(NAMES)), jnp.zeros(len(NAMES)))
    assert len(set(masks)) > 1
    other_seed = FactoredWeighting(k=2, seed=4)
    other_seed.init(NAMES)
    assert [tuple(np.asarray(other_seed.sampled({**state, "step": jnp.array(s)}))) for s in range(8)] != masks
    with pytest.raises(ValueError, match="k=5"):
        FactoredWeighting(k=5).init(NAMES)


# ------------------------------------------------------------------ the example


def run_example(model_dir, steps: int) -> EndTaskAware:
    """examples/tartan_aang.gin, made tiny (two combinations, K = 1), in this process; returns its mode."""
    run = ["TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}", "BATCH_SIZE = 8", f"TRAIN_STEPS = {steps}",
           "train.log_period = 1", "train.eval_period = 0", "train.checkpoint_period = 2",
           "train.progress_bar = False", f"MODEL_DIR = '{model_dir}'", "FactoredWeighting.k = 1",
           "objective_space_auxiliaries.data = ['task']", "objective_space_auxiliaries.transforms = ['none', 'mask']",
           "objective_space_auxiliaries.representations = ['l2r']",
           "objective_space_auxiliaries.outputs = ['denoise', 'task']",
           *(f"T5Config.{k} = {v}" for k, v in {"d_model": 16, "num_heads": 2, "head_dim": 8, "d_ff": 32,
                                                 "num_encoder_layers": 1, "num_decoder_layers": 1}.items())]
    gin.clear_config()
    cli.parse_gin([str(cli.GIN_CONFIGS_DIR / "examples/tartan_aang.gin")], run)
    try:
        mode = gin.query_parameter("train.training_mode").scoped_configurable_fn()
        loop.train()
    finally:
        gin.clear_config()
    return mode


def logged(model_dir) -> dict[int, dict[str, float]]:
    """step -> the train metrics logged at it."""
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("train/") and "per_second" not in k}
            for r in records if "train/loss" in r}


@pytest.mark.slow
def test_the_aang_example_trains_the_sampled_combinations_and_resumes_exactly(tmp_path):
    """Every step weights the end task and one drawn combination; the O=task combination reads the end task's
    train part only; resumed from the step-2 checkpoint, the run draws, weights and logs as the straight one."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    mode = run_example(straight, 4)
    assert mode.auxiliaries == {"task_mask_l2r_denoise": "aang_task_mask_l2r_denoise",
                                "task_none_l2r_task": "aang_task_none_l2r_task_minus_dev20"}
    for metrics in logged(straight).values():
        weights = [metrics[f"train/aux_weight/{n}"] for n in mode.names]
        assert sum(weights) == pytest.approx(1.0, abs=1e-5) and sum(w > 0 for w in weights) == 2
    shutil.copytree(straight / "checkpoints" / "2", resumed / "checkpoints" / "2")
    run_example(resumed, 4)
    assert logged(resumed) == {step: logged(straight)[step] for step in (3, 4)}


BAD_SEARCHES = {
    "objective_space_auxiliaries.transforms=['mask', 'shufle']":
        "objective space: the transform options ['mask', 'shufle'] must be distinct values from "
        "['none', 'mask', 'replace', 'span'], at least one.",
    "objective_space_auxiliaries.outputs=['next']": (
        "objective_space_auxiliaries: no valid combination of the options [['task', 'general'], ['none', 'mask'], "
        "['bi'], ['next']] (see the rules in t5x_lite/data/objective_stages.py)."),
    "FactoredWeighting.k=10":
        "FactoredWeighting.k=10 combinations per step must lie between 1 and the 9 combinations among the objectives.",
}


@pytest.mark.slow
@pytest.mark.parametrize("binding", BAD_SEARCHES)
def test_a_bad_search_is_one_clear_error(tmp_path, binding):
    model_dir = tmp_path / "run"
    extra = ["--gin.objective_space_auxiliaries.representations=['bi']"] if "outputs" in binding else []
    result = run_cli("--gin_file=examples/tartan_aang.gin", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.{binding}",
                     *extra)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"error: {BAD_SEARCHES[binding]}"
    assert "Traceback" not in result.stderr
    assert not model_dir.exists() or not any(model_dir.rglob("*"))
