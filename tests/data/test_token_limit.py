"""Tests of the token limit (`t5x_lite.data.token_limit`): T5's data-size-with-repeats experiment."""

from __future__ import annotations

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

import t5x_lite.tasks  # noqa: F401  (registers the bundled tasks these tests read)
from t5x_lite.data import pipeline, registration, sources, token_limit, vocab

VOCAB = vocab.get_vocabulary()


def _documents(lengths) -> tf.data.Dataset:
    rows = [np.arange(1, n + 1, dtype=np.int32) + 100 * i for i, n in enumerate(lengths)]
    return tf.data.Dataset.from_generator(lambda: ({"targets": r} for r in rows),
                                          output_signature={"targets": tf.TensorSpec([None], tf.int32)})


def _rows(ds: tf.data.Dataset, key: str = "targets") -> list[list[int]]:
    return [list(ex[key]) for ex in ds.as_numpy_iterator()]


def _train_stream(num_lines: int | None = None) -> list[int]:
    with open(sources.BUNDLED_DIR / "train.txt") as f:
        lines = f.read().splitlines()[:num_lines]
    return [t for line in lines for t in VOCAB.encode(line)]


@pytest.mark.parametrize("limit,expected", [(12, [5, 7]), (13, [5, 7, 1]), (1, [1]), (25, [5, 7, 3, 10]),
                                            (100, [5, 7, 3, 10])])
def test_limit_tokens_keeps_exactly_the_first_n_tokens(limit, expected):
    rows = _rows(token_limit.limit_tokens(_documents([5, 7, 3, 10]), limit))
    assert [len(r) for r in rows] == expected
    whole = [t for r in _rows(_documents([5, 7, 3, 10])) for t in r]
    assert [t for r in rows for t in r] == whole[:limit]


def test_limit_tokens_stops_reading_at_the_limit():
    read = []

    def note(tokens):
        read.append(len(tokens))
        return tokens

    documents = _documents([4, 4, 4, 4]).map(lambda ex: {"targets": tf.py_function(note, [ex["targets"]], tf.int32)})
    assert len(_rows(token_limit.limit_tokens(documents, 8))) == 2
    assert len(read) <= 3  # the document that shows the limit is reached, no further


def test_limited_task_train_split_is_the_first_n_tokens_and_validation_is_whole():
    name = token_limit.register_token_limited_task("bundled_span_corruption", 5000)
    assert name == "bundled_span_corruption_first_5000_tokens"
    assert token_limit.register_token_limited_task("bundled_span_corruption", 5000) == name  # again: same task
    task = seqio.get_mixture_or_task(name)
    assert token_limit.count_tokens(name) == 5000
    kept = [t for ex in task.preprocess_precache(task.source.get_dataset("train")).as_numpy_iterator()
            for t in ex["targets"]]
    assert kept == _train_stream(200)[:5000]
    assert token_limit.count_tokens(name, "validation") == token_limit.count_tokens("bundled_span_corruption", "validation")
    lengths = {"inputs": 64, "targets": 16}
    ours = task.get_dataset(lengths, split="validation", shuffle=False, seed=0)
    theirs = seqio.get_mixture_or_task("bundled_span_corruption").get_dataset(lengths, split="validation",
                                                                              shuffle=False, seed=0)
    assert _rows(ours, "inputs") == _rows(theirs, "inputs")


def test_the_limited_tokens_repeat_for_as_many_epochs_as_asked():
    name = token_limit.register_token_limited_task("bundled_lm", 300)
    task = seqio.get_mixture_or_task(name)
    documents = [list(ex["targets"]) for ex in task.preprocess_precache(task.source.get_dataset("train")).as_numpy_iterator()]
    epoch = [t for d in documents for t in d + [VOCAB.eos_id]]  # the causal LM puts EOS after each document
    assert len(epoch) == 300 + len(documents)
    ds = task.get_dataset({"targets": 64}, split="train", shuffle=False, num_epochs=3, seed=0)
    assert [t for row in _rows(ds) for t in row] == epoch * 3
    endless = pipeline.get_dataset(name, {"targets": 64}, 8, seqio.DecoderFeatureConverter, seed=0)
    rows = [row for _, batch in zip(range(20), endless.as_numpy_iterator()) for row in batch["decoder_target_tokens"]]
    assert len(rows) == 160 and len(rows) * 64 > 20 * len(epoch)  # 20+ epochs of the 300 tokens, and it goes on
    assert {t for row in rows for t in row} <= set(epoch) | {0}


def test_first_tokens_are_the_same_whatever_the_seed_and_file_order(tmp_path):
    lines = (sources.BUNDLED_DIR / "validation.txt").read_text().splitlines()
    for i in range(4):
        (tmp_path / f"part-{i}.txt").write_text("\n".join(lines[20 * i: 20 * i + 20]) + "\n")
    registration.register_family_task("test_token_limit_files", "span_corruption", {"train": str(tmp_path / "part-*.txt")},
                                      overwrite=True)
    name = token_limit.register_token_limited_task("test_token_limit_files", 2000)
    task = seqio.get_mixture_or_task(name)

    def first_tokens(seed):
        return [t for ex in task.preprocess_precache(task.source.get_dataset("train", shuffle=True, seed=seed))
                .as_numpy_iterator() for t in ex["targets"]]

    assert first_tokens(0) == first_tokens(1) == first_tokens(2) and len(first_tokens(0)) == 2000
    # Training shuffles the examples made from them, as before.
    lengths = {"inputs": 32, "targets": 8}
    a = _rows(task.get_dataset(lengths, split="train", shuffle=True, seed=0).take(20), "inputs")
    b = _rows(task.get_dataset(lengths, split="train", shuffle=True, seed=1).take(20), "inputs")
    assert a != b


def test_gin_names_the_task_and_it_registers_at_its_first_lookup():
    gin.clear_config()
    try:
        gin.parse_config("token_limited_task.task = 'bundled_prefix_lm'\ntoken_limited_task.limit_tokens = 4096")
        name = token_limit.token_limited_task()
    finally:
        gin.clear_config()
    assert name == "bundled_prefix_lm_first_4096_tokens"
    assert isinstance(pipeline.get_mixture_or_task(name), token_limit.TokenLimitedTask)
    assert token_limit.count_tokens(name) == 4096


@pytest.mark.parametrize(
    "task,limit,match",
    [
        ("bundled_span_corruption", 0, "limit_tokens must be a whole number of tokens >= 1, got 0"),
        ("bundled_span_corruption", 1.5, "got 1.5"),
        ("bundled_qa_mixture", 10, "is a mixture"),
        ("bundled_cls_single", 10, "has no seqio.preprocessors.tokenize step"),
        ("no_such_task", 10, "Unknown task or mixture 'no_such_task'"),
    ],
)
def test_bad_arguments(task, limit, match):
    with pytest.raises(ValueError, match=match):
        token_limit.register_token_limited_task(task, limit)


@pytest.mark.parametrize(
    "bindings,message",
    [
        (["--gin.token_limited_task.limit_tokens=0"],
         "token_limited_task.limit_tokens must be a whole number of tokens >= 1, got 0."),
        (["--gin.token_limited_task.task='bundled_qa_mixture'", "--gin.token_limited_task.limit_tokens=4096"],
         "token_limited_task.task 'bundled_qa_mixture' is a mixture; name one of its tasks."),
    ],
)
@pytest.mark.slow
def test_cli_reports_a_bad_token_limit_in_one_line(tmp_path, bindings, message):
    from tests.test_cli import run_cli
    from tests.test_safety import assert_one_error

    task = [] if any(".task=" in b for b in bindings) else ["--gin.token_limited_task.task='bundled_span_corruption'"]
    result = run_cli("--gin_file=gin_configs/quickstart.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                     "--gin.MIXTURE_OR_TASK_NAME=@token_limited_task()", *task, *bindings)
    assert_one_error(result, message)
    assert not (tmp_path / "run" / "checkpoints").exists()
