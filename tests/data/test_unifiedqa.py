"""UnifiedQA formats: exact strings from the Python helpers, and the TF preprocessors agree with them."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from t5x_lite.data import sources
from t5x_lite.data.preprocessors import unifiedqa

SEP = " \\n "  # space, backslash, n, space

RECORDS = {
    "extractive": {
        "question": "At what speed did the turbine operate?",
        "context": "On his 50th birthday in 1906, Tesla demonstrated his  200 horsepower\n16,000 rpm bladeless turbine.",
        "answers": ["16,000 RPM", "16,000 rpm"],
    },
    "abstractive": {
        "question": "What does a drink from narcissus's spring cause the drinker to do?",
        "context": "Mercury has awakened Echo, who weeps for Narcissus.",
        "answers": ["Fall in love with themselves"],
    },
    "multiple_choice": {
        "question": "Who was Billy?",
        "options": ["The skinny kid", "A teacher", "A little kid", "The big kid"],
        "context": "Billy was like a king on the school yard.",
        "answers": ["The big kid"],
    },
    "yes_no": {
        "question": "Was America the first country to have a president?",
        "context": "(President) The first usage of the word president ...",
        "answers": ["no"],
    },
}
EXPECTED = {
    "extractive": {
        "inputs": "at what speed did the turbine operate?" + SEP
        + "on his 50th birthday in 1906, tesla demonstrated his 200 horsepower 16,000 rpm bladeless turbine.",
        "targets": "16,000 rpm",
    },
    "abstractive": {
        "inputs": "what does a drink from narcissus's spring cause the drinker to do?" + SEP
        + "mercury has awakened echo, who weeps for narcissus.",
        "targets": "fall in love with themselves",
    },
    "multiple_choice": {
        "inputs": "who was billy?" + SEP + "(a) the skinny kid (b) a teacher (c) a little kid (d) the big kid" + SEP
        + "billy was like a king on the school yard.",
        "targets": "the big kid",
    },
    "yes_no": {
        "inputs": "was america the first country to have a president?" + SEP
        + "(president) the first usage of the word president ...",
        "targets": "no",
    },
}


def test_separator_is_literal_backslash_n():
    assert unifiedqa.SEPARATOR == " " + "\\" + "n" + " " and "\n" not in unifiedqa.SEPARATOR


def test_format_helpers_exact_strings():
    r = RECORDS["extractive"]
    assert unifiedqa.format_extractive(r["question"], r["context"]) == EXPECTED["extractive"]["inputs"]
    r = RECORDS["abstractive"]
    assert unifiedqa.format_abstractive(r["question"], r["context"]) == EXPECTED["abstractive"]["inputs"]
    r = RECORDS["multiple_choice"]
    assert unifiedqa.format_multiple_choice(r["question"], r["options"], r["context"]) == EXPECTED["multiple_choice"]["inputs"]
    r = RECORDS["yes_no"]
    assert unifiedqa.format_yes_no(r["question"], r["context"]) == EXPECTED["yes_no"]["inputs"]


def test_multiple_choice_without_context_and_with_case_kept():
    assert unifiedqa.format_multiple_choice("Which is the best conductor?", ["iron", "feather"]) == (
        "which is the best conductor?" + SEP + "(a) iron (b) feather")
    assert unifiedqa.format_multiple_choice("Who?", ["Ann", "Bo"], "Ann met Bo.", lowercase=False) == (
        "Who?" + SEP + "(A) Ann (B) Bo" + SEP + "Ann met Bo.")
    with pytest.raises(ValueError, match="at least 2 options"):
        unifiedqa.format_multiple_choice("Who?", ["Ann"])


def test_yes_no_answer_from_bool_and_strings():
    assert unifiedqa.yes_no_answer(True) == "yes" and unifiedqa.yes_no_answer(False) == "no"
    assert unifiedqa.yes_no_answer(" YES ") == "yes" and unifiedqa.yes_no_answer("false") == "no"
    with pytest.raises(ValueError, match="yes/no/true/false"):
        unifiedqa.yes_no_answer("maybe")


@pytest.mark.parametrize("format", unifiedqa.FORMATS)
def test_format_example(format):
    assert unifiedqa.format_example(RECORDS[format], format) == EXPECTED[format]


def test_format_example_yes_no_from_bool_answer():
    record = dict(RECORDS["yes_no"], answers=[True])
    assert unifiedqa.format_example(record, "yes_no")["targets"] == "yes"


@pytest.mark.parametrize("format", unifiedqa.FORMATS)
def test_tf_preprocessor_matches_python(format):
    record = {"context": "", "options": [], **RECORDS[format]}
    ds = sources.records_to_dataset([record])
    out = next(unifiedqa.PREPROCESSORS[format](ds).as_numpy_iterator())
    assert out["inputs"].decode() == EXPECTED[format]["inputs"]
    assert out["targets"].decode() == EXPECTED[format]["targets"]
    assert [a.decode() for a in out["answers"]] == [unifiedqa.format_answer(a) for a in record["answers"]]


def test_tf_multiple_choice_without_context():
    record = {"question": "Which is the best conductor?", "context": "", "options": ["iron", "feather"], "answers": ["iron"]}
    out = next(unifiedqa.multiple_choice_preprocessor(sources.records_to_dataset([record])).as_numpy_iterator())
    assert out["inputs"].decode() == "which is the best conductor?" + SEP + "(a) iron (b) feather"


def test_tf_preprocessor_keeps_case_when_asked():
    record = {"question": "Who?", "context": "Ann  met\tBo.", "options": [], "answers": ["Ann"]}
    ds = unifiedqa.to_text_to_text(sources.records_to_dataset([record]), format="extractive", lowercase=False)
    out = next(ds.as_numpy_iterator())
    assert out["inputs"].decode() == "Who?" + SEP + "Ann met Bo." and out["targets"].decode() == "Ann"


def test_multiple_choice_rank_classification_expands_options():
    record = dict(RECORDS["multiple_choice"])
    other = {"question": "Which?", "context": "", "options": ["red", "Blue"], "answers": ["blue"]}
    ds = unifiedqa.multiple_choice_rank_classification(sources.records_to_dataset([record, other]))
    rows = list(ds.as_numpy_iterator())
    assert len(rows) == 6
    assert [r["targets"].decode() for r in rows[:4]] == ["the skinny kid", "a teacher", "a little kid", "the big kid"]
    assert all(r["inputs"].decode() == EXPECTED["multiple_choice"]["inputs"] for r in rows[:4])
    np.testing.assert_array_equal([r["idx"] for r in rows], [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal([r["option_index"] for r in rows], [0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal([r["is_correct"] for r in rows], [False, False, False, True, False, True])


def test_unknown_format():
    with pytest.raises(ValueError, match="Unknown UnifiedQA format 'span'"):
        unifiedqa.to_text_to_text(tf.data.Dataset.range(1), format="span")
