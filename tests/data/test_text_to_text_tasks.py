"""`register_text_to_text_task`: your own TSV/JSONL pairs as a task, its metrics, and bad files named by file and line."""

from __future__ import annotations

import json

import pytest
import seqio

from t5x_lite.data import registration, sources, vocab
from t5x_lite.data.metrics import qa as qa_metrics
from tests.test_cli import run_cli

LENGTHS = {"inputs": 32, "targets": 8}
PAIRS = [("translate: good night", "gute nacht"), ("translate: thank you", "danke")]


def write_tsv(path, pairs=PAIRS, header="inputs\ttargets"):
    path.write_text("".join(f"{line}\n" for line in [header, *(f"{a}\t{b}" for a, b in pairs)]))
    return str(path)


def write_jsonl(path, pairs=PAIRS):
    path.write_text("".join(json.dumps({"id": i, "inputs": a, "targets": b}) + "\n" for i, (a, b) in enumerate(pairs)))
    return str(path)


@pytest.fixture
def registered():
    names = []
    yield names
    for name in names:
        seqio.TaskRegistry.remove(name)


def examples(task, split="train", lengths=LENGTHS):
    return list(task.get_dataset(lengths, split=split, shuffle=False).as_numpy_iterator())


def test_tsv_and_jsonl_give_the_same_examples_ending_in_eos(tmp_path, registered):
    registered.extend(["tmp_t2t_tsv", "tmp_t2t_jsonl"])
    tsv = registration.register_text_to_text_task("tmp_t2t_tsv", {"train": write_tsv(tmp_path / "train.tsv")})
    jsonl = registration.register_text_to_text_task("tmp_t2t_jsonl", {"train": write_jsonl(tmp_path / "train.jsonl")},
                                                    format="jsonl")
    vocabulary = vocab.get_vocabulary()
    for task in (tsv, jsonl):
        got = examples(task)
        assert [(ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode()) for ex in got] == PAIRS
        for ex, (inputs, targets) in zip(got, PAIRS):
            assert ex["inputs"].tolist() == [*vocabulary.encode(inputs), vocabulary.eos_id]
            assert ex["targets"].tolist() == [*vocabulary.encode(targets), vocabulary.eos_id]
        assert task.metric_fns == [qa_metrics.accuracy]
        assert task.num_input_examples("train") == 2


def test_long_examples_are_cut_to_the_lengths_keeping_eos(tmp_path, registered):
    registered.append("tmp_t2t_long")
    task = registration.register_text_to_text_task(
        "tmp_t2t_long", {"train": write_tsv(tmp_path / "t.tsv", [("one two three four five six seven", "a b c d e f")])})
    ex = examples(task, lengths={"inputs": 4, "targets": 3})[0]
    assert len(ex["inputs"]) == 4 and len(ex["targets"]) == 3
    assert ex["inputs"][-1] == ex["targets"][-1] == vocab.get_vocabulary().eos_id


def test_metrics_by_name_and_callables(tmp_path, registered):
    def exact(targets, predictions):
        return {"exact": 100.0 * sum(t == p for t, p in zip(targets, predictions)) / len(targets)}

    registered.append("tmp_t2t_metrics")
    task = registration.register_text_to_text_task(
        "tmp_t2t_metrics", {"validation": write_tsv(tmp_path / "v.tsv")}, metrics=["squad", "rouge", exact])
    assert task.metric_fns == [qa_metrics.squad, qa_metrics.rouge, exact]
    assert registration.text_metric_fns("f1") == [qa_metrics.squad_f1]
    with pytest.raises(ValueError, match=r"Unknown metric 'bleu'; use one of \['accuracy', 'f1', 'rouge', 'squad'\]"):
        registration.register_text_to_text_task("tmp_t2t_bad", {"train": str(tmp_path / "v.tsv")}, metrics=["bleu"])
    assert "tmp_t2t_bad" not in seqio.TaskRegistry.names()


def test_evaluator_scores_the_decoded_text_against_the_targets(tmp_path, registered):
    registered.append("tmp_t2t_eval")
    registration.register_text_to_text_task("tmp_t2t_eval", {"validation": write_tsv(tmp_path / "v.tsv")},
                                            metrics=["accuracy", "squad"])
    evaluator = seqio.Evaluator("tmp_t2t_eval", feature_converter=seqio.EncDecFeatureConverter(pack=False),
                                eval_split="validation", sequence_length=None, async_compute_metrics=False)

    def predict_first_target(ds):  # the first example's answer for every example: one of two right
        first = next(ds.as_numpy_iterator())[1]["decoder_target_tokens"]
        return [(i, first) for i, _ in ds.as_numpy_iterator()]

    metrics, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_first_target)
    values = {k: getattr(v, "value", v) for k, v in metrics.result()["tmp_t2t_eval"].items()}
    assert values == {"accuracy": 50.0, "em": 50.0, "f1": 50.0}


BAD_FILES = [  # (file name, text, the error after "<folder>/")
    ("empty.tsv", "", ("empty.tsv: no examples (the file is empty); a .tsv file needs the header row "
                       "'inputs<TAB>targets', then one example per line.")),
    ("header_only.tsv", "inputs\ttargets\n", ("header_only.tsv: no examples (only the header row); a .tsv file "
                                              "needs the header row 'inputs<TAB>targets', then one example per line.")),
    ("no_header.tsv", "hello\tworld\n", ("no_header.tsv, line 1: the first row must be the header "
                                         "'inputs<TAB>targets', got 'hello\\tworld'.")),
    ("missing_column.tsv", "inputs\ttargets\na\tb\nc\n", ("missing_column.tsv, line 3: 1 tab-separated cells, "
                                                          "expected 2 (inputs<TAB>targets); the targets column is missing.")),
    ("tabs.tsv", "inputs\ttargets\na\tb\n\nc\td\te\n", ("tabs.tsv, line 4: 3 tab-separated cells, expected 2 "
                                                        "(inputs<TAB>targets); a text may not contain a tab (use .jsonl).")),
    ("empty_cell.tsv", "inputs\ttargets\na\t \n", "empty_cell.tsv, line 2: the 'targets' text is empty."),
    ("empty.jsonl", "\n", ("empty.jsonl: no examples (the file is empty); a .jsonl file needs one JSON object per "
                           'line, e.g. {"inputs": "translate: Good night", "targets": "Gute Nacht"}.')),
    ("no_targets.jsonl", '{"inputs": "a", "targets": "b"}\n{"inputs": "c", "target": "d"}\n',
     "no_targets.jsonl, line 2: no 'targets' field (fields present: ['inputs', 'target'])."),
    ("not_json.jsonl", '{"inputs": "a"\n', "not_json.jsonl, line 1: not valid JSON (Expecting ',' delimiter): '{\"inputs\": \"a\"'."),
    ("not_object.jsonl", '["a", "b"]\n', "not_object.jsonl, line 1: expected a JSON object, got list."),
    ("not_string.jsonl", '{"inputs": "a", "targets": 3}\n', "not_string.jsonl, line 1: 'targets' must be a string, got int."),
]


@pytest.mark.parametrize("filename, text, message", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_file_is_one_line_naming_file_and_line(tmp_path, filename, text, message):
    path = tmp_path / filename
    path.write_text(text)
    with pytest.raises(sources.TextToTextFileError) as error:
        registration.register_text_to_text_task("tmp_t2t_bad", {"train": str(path)}, format=path.suffix[1:])
    assert str(error.value) == f"{tmp_path}/{message}"
    assert "\n" not in str(error.value)
    assert "tmp_t2t_bad" not in seqio.TaskRegistry.names()


def test_missing_files_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Task 'tmp_t2t_none': no file matches '.*nothing\*\.tsv' for split 'train'"):
        registration.register_text_to_text_task("tmp_t2t_none", {"train": str(tmp_path / "nothing*.tsv")})
    with pytest.raises(ValueError, match=r"Unknown text-to-text file format 'csv'; use one of \['tsv', 'jsonl'\]"):
        registration.register_text_to_text_task("tmp_t2t_none", {"train": write_tsv(tmp_path / "t.tsv")}, format="csv")


BAD_TASK_MODULE = """
from t5x_lite.data import registration

registration.register_text_to_text_task("my_bad_task", {"train": "data/train.tsv"})
"""


@pytest.mark.slow
def test_cli_reports_a_bad_line_of_a_task_module_in_one_line(tmp_path):
    (tmp_path / "my_bad_tasks.py").write_text(BAD_TASK_MODULE)
    (tmp_path / "data").mkdir()
    bad = "inputs\ttargets\nhello\tworld\nsee\tyou\tlater\n"
    (tmp_path / "data" / "train.tsv").write_text(bad)
    result = run_cli("--gin_file=quickstart.gin", "--gin.MIXTURE_OR_TASK_MODULE='my_bad_tasks'",
                     "--gin.MIXTURE_OR_TASK_NAME='my_bad_task'", "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}",
                     "--gin.TRAIN_STEPS=2", "--gin.MODEL_DIR='runs/bad'", cwd=tmp_path)
    assert result.returncode == 2
    assert ("error: data/train.tsv, line 3: 3 tab-separated cells, expected 2 (inputs<TAB>targets); "
            "a text may not contain a tab (use .jsonl).") in result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert (tmp_path / "data" / "train.tsv").read_text() == bad
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()
