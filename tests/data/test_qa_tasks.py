"""QA tasks: the bundled QA sets end to end, the mixture's rates, your own files, bad input, TFDS absent."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_lite.data import registration, vocab
from t5x_lite.data.metrics import qa as qa_metrics
from t5x_lite.data.preprocessors import unifiedqa
from t5x_lite.tasks import qa as qa_tasks

LENGTHS = {"inputs": 512, "targets": 64}
QA_DIR = qa_tasks.QA_DIR


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def unk_view(text: str) -> str:
    """How the bundled vocabulary decodes text: it has no backslash piece, so `\\` comes back as ` ⁇ `."""
    return text.replace("\\", " \u2047 ")


# ------------------------------------------------------------------ the bundled QA sets


@pytest.mark.parametrize("format", unifiedqa.FORMATS)
def test_bundled_files_shape_and_stats(format):
    train, valid = (read_jsonl(QA_DIR / f"{format}_{split}.jsonl") for split in ("train", "validation"))
    assert 500 <= len(train) <= 2000 and 100 <= len(valid) <= 200
    for r in train + valid:
        assert set(r) == ({"question", "context", "answers", "options"} if format == "multiple_choice"
                          else {"question", "context", "answers"})
        assert r["question"] and r["context"] and r["answers"]
        assert len(r["context"].split()) <= 100
    # Validation comes from The Tempest only, which training never uses.
    assert not {r["context"] for r in train} & {r["context"] for r in valid}
    tempest = (QA_DIR.parent / "validation.txt").read_text()
    assert all(r["context"].split(" ")[0].rstrip(".") in tempest for r in valid)


def test_bundled_extractive_answers_occur_in_context():
    for split in ("train", "validation"):
        for r in read_jsonl(QA_DIR / f"extractive_{split}.jsonl"):
            assert r["answers"][0] in r["context"]
            assert unifiedqa.format_answer(r["answers"][0]) in unifiedqa.normalize_text(r["context"])


def test_bundled_yes_no_is_balanced():
    for split in ("train", "validation"):
        records = read_jsonl(QA_DIR / f"yes_no_{split}.jsonl")
        share = np.mean([r["answers"] == ["yes"] for r in records])
        assert 0.4 <= share <= 0.6, (split, share)
        for kind in ("speak in this passage", " say "):
            sub = [r for r in records if kind in r["question"]]
            assert 0.4 <= np.mean([r["answers"] == ["yes"] for r in sub]) <= 0.6


def test_bundled_multiple_choice_answer_is_one_of_four_options():
    for split in ("train", "validation"):
        for r in read_jsonl(QA_DIR / f"multiple_choice_{split}.jsonl"):
            assert len(r["options"]) == 4 and r["options"].count(r["answers"][0]) == 1


@pytest.mark.parametrize("format", unifiedqa.FORMATS)
def test_bundled_task_examples_decode_to_formatted_strings(format):
    task = seqio.get_mixture_or_task(f"bundled_qa_{format}")
    assert set(task.splits) == {"train", "validation"}
    records = read_jsonl(QA_DIR / f"{format}_validation.jsonl")
    ds = task.get_dataset(LENGTHS, split="validation", shuffle=False)
    examples = list(ds.take(20).as_numpy_iterator())
    v = vocab.get_vocabulary()
    for ex, record in zip(examples, records):
        expected = unifiedqa.format_example(record, format)
        assert ex["inputs_pretokenized"].decode() == expected["inputs"]
        assert ex["targets_pretokenized"].decode() == expected["targets"]
        assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1  # EOS
        assert ex["inputs"].tolist() == v.encode(expected["inputs"]) + [1]
        assert v.decode(ex["inputs"].tolist()) == unk_view(expected["inputs"])
        assert v.decode(ex["targets"].tolist()) == expected["targets"]
    assert task.num_input_examples("validation") == len(records)


def test_bundled_inputs_fit_512_tokens():
    v = vocab.get_vocabulary()
    for format in unifiedqa.FORMATS:
        for split in ("train", "validation"):
            lengths = [len(v.encode(unifiedqa.format_example(r, format)["inputs"])) + 1
                       for r in read_jsonl(QA_DIR / f"{format}_{split}.jsonl")]
            assert max(lengths) <= 512


# ------------------------------------------------------------------ evaluation path


def perfect_predict_fn(ds):
    return [(i, ex["decoder_target_tokens"]) for i, ex in ds.as_numpy_iterator()]


@pytest.mark.parametrize("format, expected", [
    ("extractive", {"em": 100.0, "f1": 100.0}),
    ("abstractive", {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "f1": 100.0}),
    ("multiple_choice", {"accuracy": 100.0}),
    ("yes_no", {"accuracy": 100.0}),
])
def test_seqio_evaluator_with_perfect_predictions(format, expected):
    evaluator = seqio.Evaluator(
        f"bundled_qa_{format}", feature_converter=seqio.EncDecFeatureConverter(pack=False),
        eval_split="validation", sequence_length={"inputs": 320, "targets": 64}, num_examples=16,
        async_compute_metrics=False,
    )
    metrics, _ = evaluator.evaluate(compute_metrics=True, predict_fn=perfect_predict_fn)
    metrics = metrics.result()  # a concurrent Future even when computed synchronously
    values = {k: getattr(v, "value", v) for k, v in metrics[f"bundled_qa_{format}"].items()}
    assert values == pytest.approx(expected)


def test_squad_targets_keep_every_reference():
    ex = {"answers": np.array([b"denver broncos", b"the broncos"])}
    assert qa_metrics.postprocess_with_references("ignored", example=ex, is_target=True) == ["denver broncos", "the broncos"]
    assert qa_metrics.postprocess_with_references(" broncos ", example=ex, is_target=False) == "broncos"
    assert qa_metrics.squad([qa_metrics.postprocess_with_references("", example=ex, is_target=True)], ["Broncos"])["em"] == 100.0


# ------------------------------------------------------------------ the mixture


def task_of(inputs: str) -> str:
    question, rest = inputs.split(unifiedqa.SEPARATOR, 1)
    if question.startswith("who says"):
        return "extractive"
    if question.startswith("does "):
        return "yes_no"
    return "multiple_choice" if rest.startswith("(a) ") else "abstractive"


def sample_task_shares(name: str, n: int) -> dict[str, float]:
    ds = seqio.get_mixture_or_task(name).get_dataset(
        LENGTHS, split="train", seed=7, copy_pretokenized=True, log_mixing_proportions=False)
    counts = collections.Counter(task_of(ex["inputs_pretokenized"].decode())
                                 for ex in ds.take(n).as_numpy_iterator())
    return {f"bundled_qa_{k}": c / n for k, c in counts.items()}


def expected_shares(sizes: dict[str, int], maximum, temperature) -> dict[str, float]:
    rates = {k: min(n, maximum or n) ** (1 / temperature) for k, n in sizes.items()}
    return {k: r / sum(rates.values()) for k, r in rates.items()}


def test_bundled_mixture_samples_tasks_examples_proportionally():
    mixture = seqio.get_mixture_or_task(qa_tasks.BUNDLED_MIXTURE)
    sizes = {t.name: t.num_input_examples("train") for t in mixture.tasks}
    assert sorted(sizes.values()) == [600, 800, 1000, 1200]
    expected = expected_shares(sizes, registration.QA_MIXING_MAXIMUM, 1.0)  # 1000, 800, 1000, 600 of 3400
    assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == pytest.approx(
        {k: min(n, 1000) for k, n in sizes.items()})
    shares = sample_task_shares(qa_tasks.BUNDLED_MIXTURE, 2000)  # binomial sd <= 0.011
    for name, share in expected.items():
        assert shares[name] == pytest.approx(share, abs=0.03), (name, shares, expected)


@pytest.mark.parametrize("maximum, temperature", [(None, 1.0), (700, 2.0)])
def test_configured_mixture_rates(maximum, temperature):
    names = ["bundled_qa_yes_no", "bundled_qa_abstractive"]
    registration.register_qa_mixture("tmp_qa_mix", names, maximum=maximum, temperature=temperature, overwrite=True)
    try:
        sizes = {"bundled_qa_yes_no": 1200, "bundled_qa_abstractive": 600}
        expected = expected_shares(sizes, maximum, temperature)  # 2/3 | sqrt(700)/(sqrt(700)+sqrt(600)) = 0.519
        shares = sample_task_shares("tmp_qa_mix", 1500)  # binomial sd <= 0.013
        assert shares["bundled_qa_yes_no"] == pytest.approx(expected["bundled_qa_yes_no"], abs=0.035)
    finally:
        seqio.MixtureRegistry.remove("tmp_qa_mix")


def test_qa_mixing_rate_formula():
    task = seqio.get_mixture_or_task("bundled_qa_yes_no")
    assert registration.qa_mixing_rate(task) == 1000
    assert registration.qa_mixing_rate(task, maximum=None, temperature=2.0) == pytest.approx(1200 ** 0.5)


# ------------------------------------------------------------------ your own files


@pytest.fixture
def registered():
    names = []
    yield names
    for name in names:
        seqio.TaskRegistry.remove(name)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_register_from_jsonl(tmp_path, registered):
    records = [
        {"question": "Who wrote it?", "context": "It was written by Ann.", "answers": ["Ann", "ann"]},
        {"question": "Where?", "context": "In Paris, of course.", "answer": "Paris"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    registered.append("tmp_qa_jsonl")
    task = registration.register_qa_task("tmp_qa_jsonl", {"train": path}, "extractive")
    assert task.metric_fns == [qa_metrics.squad]
    examples = list(task.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator())
    assert [ex["inputs_pretokenized"].decode() for ex in examples] == [
        "who wrote it?" + unifiedqa.SEPARATOR + "it was written by ann.",
        "where?" + unifiedqa.SEPARATOR + "in paris, of course."]
    assert [ex["targets_pretokenized"].decode() for ex in examples] == ["ann", "paris"]
    assert examples[0]["answers"].tolist() == [b"ann", b"ann"]
    assert vocab.get_vocabulary().decode(examples[1]["targets"].tolist()) == "paris"
    assert task.num_input_examples("train") == 2


def test_register_from_tsv_multiple_choice_and_yes_no(tmp_path, registered):
    (tmp_path / "mc.tsv").write_text(
        "question\toptions\tanswer\tcontext\n"
        "Which is the best conductor?\tiron | feather\tiron\t\n"
        "Who was Billy?\tThe skinny kid|The big kid\tThe big kid\tBilly was like a king.\n")
    (tmp_path / "yn.tsv").write_text("question\tcontext\tanswer\nIs it?\tIt is.\ttrue\nIs it not?\tIt is.\tNo\n")
    registered.extend(["tmp_qa_mc", "tmp_qa_yn"])
    mc = registration.register_qa_task("tmp_qa_mc", {"validation": str(tmp_path / "mc.tsv")}, "multiple_choice")
    yn = registration.register_qa_task("tmp_qa_yn", {"train": str(tmp_path / "yn.tsv")}, "yes_no")
    assert mc.metric_fns == [qa_metrics.accuracy] and yn.metric_fns == [qa_metrics.accuracy]
    ex = list(mc.get_dataset(LENGTHS, split="validation", shuffle=False).as_numpy_iterator())
    assert ex[0]["inputs_pretokenized"].decode() == "which is the best conductor?" + unifiedqa.SEPARATOR + "(a) iron (b) feather"
    assert ex[1]["inputs_pretokenized"].decode() == (
        "who was billy?" + unifiedqa.SEPARATOR + "(a) the skinny kid (b) the big kid" + unifiedqa.SEPARATOR
        + "billy was like a king.")
    assert [e["targets_pretokenized"].decode() for e in ex] == ["iron", "the big kid"]
    ex = list(yn.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator())
    assert [e["targets_pretokenized"].decode() for e in ex] == ["yes", "no"]


def test_multiple_choice_answer_index_and_custom_metrics(tmp_path, registered):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Q?", "options": ["a", "b", "c"], "answers": [2]}])
    registered.append("tmp_qa_mc_index")
    task = registration.register_qa_task("tmp_qa_mc_index", {"train": path}, "multiple_choice",
                                     metric_fns=[qa_metrics.squad])
    assert task.metric_fns == [qa_metrics.squad]
    assert next(task.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator())["targets_pretokenized"] == b"c"


def test_record_missing_a_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"question": "Who?", "context": "Ann.", "answers": ["Ann"]},
        {"question": "Who else?", "answers": ["Bo"]},
    ])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: the record has no 'context' field.*'extractive'"):
        registration.register_qa_task("tmp_qa_bad", {"train": path}, "extractive")
    assert "tmp_qa_bad" not in seqio.TaskRegistry.names()
    path = write_jsonl(tmp_path / "bad_mc.jsonl", [{"question": "Q?", "answers": ["x"]}])
    with pytest.raises(ValueError, match=r"bad_mc\.jsonl, line 1: the record has no 'options' field"):
        registration.register_qa_task("tmp_qa_bad", {"train": path}, "multiple_choice")
    (tmp_path / "bad.tsv").write_text("question\tcontext\nWho?\tAnn.\n")
    with pytest.raises(ValueError, match=r"bad\.tsv, line 2: the record has no 'answers' field \(or 'answer'\)"):
        registration.register_qa_task("tmp_qa_bad", {"train": str(tmp_path / "bad.tsv")}, "extractive")


def test_bad_values_are_named(tmp_path):
    cases = [
        ({"question": "Q?", "options": ["a", "b"], "answers": ["z"]}, "multiple_choice", "not one of the options"),
        ({"question": "Q?", "context": "c", "answers": ["maybe"]}, "yes_no", "yes/no/true/false"),
    ]
    for record, format, message in cases:
        path = write_jsonl(tmp_path / f"{format}.jsonl", [record])
        with pytest.raises(ValueError, match=rf"line 1: .*{message}"):
            registration.register_qa_task("tmp_qa_bad", {"train": path}, format)
    (tmp_path / "broken.jsonl").write_text('{"question": "Q?"\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 1: not valid JSON"):
        registration.register_qa_task("tmp_qa_bad", {"train": str(tmp_path / "broken.jsonl")}, "extractive")


@pytest.mark.parametrize("filename, text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.tsv", ""),
                                            ("header_only.tsv", "question\tcontext\tanswer\n")])
def test_empty_file(tmp_path, filename, text):
    (tmp_path / filename).write_text(text)
    with pytest.raises(ValueError, match=rf"{filename.replace('.', '[.]')}: no records \(the file is empty\)"):
        registration.register_qa_task("tmp_qa_empty", {"train": str(tmp_path / filename)}, "extractive")


def test_missing_file_unknown_extension_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="tmp_qa_none.*No file matches"):
        registration.register_qa_task("tmp_qa_none", {"train": str(tmp_path / "nothing*.jsonl")}, "extractive")
    (tmp_path / "data.csv").write_text("question,context,answer\n")
    with pytest.raises(ValueError, match="unknown QA file type '.csv'"):
        registration.register_qa_task("tmp_qa_none", {"train": str(tmp_path / "data.csv")}, "extractive")
    with pytest.raises(ValueError, match="Unknown UnifiedQA format"):
        registration.register_qa_task("tmp_qa_none", {"train": str(tmp_path / "data.csv")}, "span")


# ------------------------------------------------------------------ TFDS tasks


def test_squad_and_boolq_record_adapters():
    squad = tf.data.Dataset.from_tensor_slices({
        "question": ["At what speed did the turbine operate?"],
        "context": ["Tesla demonstrated his 16,000 rpm bladeless turbine."],
        "answers": {"text": tf.ragged.constant([["16,000 rpm", "16,000 RPM"]]),
                    "answer_start": tf.ragged.constant([[23, 23]])},
        "title": ["Nikola_Tesla"], "id": ["x"],
    })
    ex = next(unifiedqa.extractive_preprocessor(unifiedqa.squad_to_records(squad)).as_numpy_iterator())
    assert ex["inputs"].decode() == ("at what speed did the turbine operate?" + unifiedqa.SEPARATOR
                                     + "tesla demonstrated his 16,000 rpm bladeless turbine.")
    assert ex["targets"] == b"16,000 rpm" and ex["answers"].tolist() == [b"16,000 rpm", b"16,000 rpm"]
    boolq = tf.data.Dataset.from_tensor_slices({
        "question": ["was america the first country to have a president", "is it?"],
        "passage": ["(President) The first usage ...", "It is."], "label": [0, 1], "idx": [0, 1]})
    out = list(unifiedqa.yes_no_preprocessor(unifiedqa.boolq_to_records(boolq)).as_numpy_iterator())
    assert out[0]["inputs"].decode() == ("was america the first country to have a president?" + unifiedqa.SEPARATOR
                                         + "(president) the first usage ...")
    assert [o["targets"] for o in out] == [b"no", b"yes"]
    assert out[1]["inputs"].decode().startswith("is it?" + unifiedqa.SEPARATOR)


@pytest.mark.parametrize("task_name, tfds_name", [("squad_v1_1_unifiedqa", "squad/v1.1:3.0.0"),
                                                  ("boolq_unifiedqa", "super_glue/boolq:1.0.2")])
def test_tfds_tasks_absent_fail_at_once_naming_the_flag(tmp_path, task_name, tfds_name):
    seqio.set_tfds_data_dir_override(str(tmp_path))
    seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()
    try:
        task = seqio.get_mixture_or_task(task_name)
        with pytest.raises(FileNotFoundError, match=rf"{tfds_name}.*not prepared.*--tfds_data_dir"):
            task.get_dataset(LENGTHS, split="validation")
    finally:
        seqio.set_tfds_data_dir_override(None)
        seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()


def test_build_qa_tool_reproduces_the_bundled_validation_files(tmp_path):
    import sys

    sys.path.insert(0, str(QA_DIR.parents[3] / "tools"))
    import build_qa

    build_qa.build_files(QA_DIR.parent, tmp_path, splits=("validation",), check_tokens=False)
    for format in unifiedqa.FORMATS:
        name = f"{format}_validation.jsonl"
        assert (tmp_path / name).read_bytes() == (QA_DIR / name).read_bytes(), name


def test_rank_classification_task_scores_every_option():
    """Through seqio.Evaluator: a scorer that prefers the correct option gets 100% accuracy."""
    from t5x_lite.data import vocab as vocab_lib

    task = seqio.get_mixture_or_task("bundled_qa_multiple_choice_rank")
    evaluator = seqio.Evaluator("bundled_qa_multiple_choice_rank", seqio.EncDecFeatureConverter(pack=False),
                                eval_split="validation", sequence_length={"inputs": 320, "targets": 32},
                                num_examples=40, async_compute_metrics=False)
    rows = list(task.get_dataset({"inputs": 320, "targets": 32}, split="validation", shuffle=False)
                .take(40).as_numpy_iterator())
    assert len({int(r["idx"]) for r in rows}) == 10 and sum(bool(r["is_correct"]) for r in rows) == 10
    assert vocab_lib.get_vocabulary().decode(rows[0]["targets"].tolist())

    def score_fn(ds):
        return [(i, 0.0 if bool(rows[i]["is_correct"]) else -1.0) for i, _ in ds.as_numpy_iterator()]

    metrics, _ = evaluator.evaluate(compute_metrics=True, score_fn=score_fn)
    assert metrics.result()["bundled_qa_multiple_choice_rank"]["accuracy"] == 100.0
