"""QA metrics on hand-computed cases (SQuAD v1.1 official definitions, ROUGE, rank classification)."""

from __future__ import annotations

import numpy as np
import pytest

from t5x_lite.data.metrics import qa as qa_metrics


def test_squad_normalisation():
    assert qa_metrics.normalize_squad_answer("The  Cat, sat!") == "cat sat"
    assert qa_metrics.normalize_squad_answer("An apple a day") == "apple day"
    assert qa_metrics.normalize_squad_answer("theatre") == "theatre"  # articles only as whole words
    assert qa_metrics.normalize_squad_answer("Rock-n-roll's") == "rocknrolls"  # punctuation removed, not split


def test_squad_exact_match_ignores_articles_punctuation_case():
    assert qa_metrics.squad([["The Big Kid."]], ["big kid"]) == {"em": 100.0, "f1": 100.0}
    assert qa_metrics.squad(["an apple"], ["apples"]) == {"em": 0.0, "f1": 0.0}


def test_squad_partial_overlap_f1_by_hand():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: 2 shared tokens,
    # precision 2/2, recall 2/3, F1 = 2 * 1 * (2/3) / (1 + 2/3) = 0.8.
    scores = qa_metrics.squad(["a cat sat down"], ["the cat sat"])
    assert scores["em"] == 0.0
    assert scores["f1"] == pytest.approx(80.0)
    # Tokens count with multiplicity: pred [cat, cat] vs ref [cat]: 1 shared, P=1/2, R=1, F1=2/3.
    assert qa_metrics.squad(["cat"], ["cat cat"])["f1"] == pytest.approx(200 / 3)


def test_squad_takes_best_reference_and_averages_in_percent():
    targets = [["Denver Broncos", "The Broncos"], ["1906"], "sixteen thousand rpm"]
    predictions = ["broncos", "1906", "16,000 rpm"]
    # ex1: EM vs "The Broncos" -> 1, F1 1; ex2: 1, 1; ex3: EM 0, F1: [16000, rpm] vs [sixteen, thousand, rpm]
    # -> P 1/2, R 1/3, F1 0.4.
    scores = qa_metrics.squad(targets, predictions)
    assert scores["em"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 1 + 0.4) / 3)
    assert qa_metrics.squad_f1(targets, predictions) == {"f1": scores["f1"]}


def test_squad_accepts_bytes_and_checks_lengths():
    assert qa_metrics.squad([[b"Paris"]], ["paris"])["em"] == 100.0
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        qa_metrics.squad(["a", "b"], ["a"])


def test_accuracy():
    assert qa_metrics.accuracy(["yes", "no", "the big kid", "no"], ["yes", "yes", " The  big kid", "no"]) == {"accuracy": 75.0}
    assert qa_metrics.accuracy([["a", "b"]], ["b"]) == {"accuracy": 100.0}


def test_rouge_simple_case():
    # ref "the cat sat on the mat" (6 tokens), pred "the cat sat" (3): unigram P 1, R 1/2 -> F 2/3;
    # bigrams: pred {the cat, cat sat} all in ref's 5 -> P 1, R 2/5 -> F 4/7; LCS 3 -> like ROUGE-1.
    scores = qa_metrics.rouge(["the cat sat on the mat"], ["the cat sat"])
    assert scores["rouge1"] == pytest.approx(200 / 3)
    assert scores["rouge2"] == pytest.approx(400 / 7)
    assert scores["rougeL"] == pytest.approx(200 / 3)
    assert qa_metrics.rouge(["Exactly this."], ["exactly this"]) == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    # Best reference wins.
    assert qa_metrics.rouge([["nothing alike", "the cat sat"]], ["the cat sat"])["rouge1"] == 100.0


def test_rank_classification_accuracy():
    scores = [[-1.0, -0.5, -3.0], [-2.0, -4.0], [0.0, 0.0, -1.0, -9.0], [float("nan"), -1.0]]
    np.testing.assert_array_equal(qa_metrics.rank_classification_predictions(scores), [1, 0, 0, 1])
    # Ties go to the first option; NaN never wins.
    assert qa_metrics.rank_classification_accuracy(scores, [1, 1, 0, 1]) == {"accuracy": 75.0}
    with pytest.raises(ValueError, match="out of range"):
        qa_metrics.rank_classification_accuracy([[0.0, 1.0]], [2])


def test_rank_classification_seqio_score_signature():
    # Rows (idx, is_correct) as produced by unifiedqa.multiple_choice_rank_classification.
    targets = [(0, False), (0, True), (0, False), (1, True), (1, False), (2, False), (2, True)]
    scores = [-3.0, -1.0, -2.0, -5.0, -0.1, -1.0, -1.5]
    # idx 0: best row is correct; idx 1: best row (-0.1) is wrong; idx 2: best (-1.0) is wrong.
    assert qa_metrics.rank_classification(targets, scores)["accuracy"] == pytest.approx(100 / 3)
