"""QA metrics with seqio's metric-fn signature `fn(targets, predictions) -> dict[str, float]`, in percent.

`squad` (`em`, `f1`) and `squad_f1` are the official SQuAD v1.1 evaluation; `accuracy` compares text with
whitespace collapsed and case ignored; `rouge` (`rouge1`, `rouge2`, `rougeL`) takes the `rouge-score` package's
F-measures (its tokenizer: lower-case, non-alphanumerics dropped; Porter stemming); `rank_classification` answers
multiple choice by the best-scoring option. A target may be a string or a list of reference strings (for SQuAD:
every annotator's answer): each prediction takes its best score over them, the dataset score is the mean.
The postprocessors turn decoded outputs and examples into what these metrics take. Pure Python and numpy.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _to_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _references(target: Any) -> list[str]:
    """A target as a non-empty list of reference strings."""
    if isinstance(target, (str, bytes)):
        return [_to_str(target)]
    refs = [_to_str(t) for t in target]
    if not refs:
        raise ValueError("A target has no reference answers (an empty list).")
    return refs


def _plain(text: str) -> str:
    return " ".join(text.split()).lower()


def _check_lengths(targets: Sequence[Any], predictions: Sequence[Any]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions; they must pair up.")


# ------------------------------------------------------------------ postprocessors


def postprocess_text(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False) -> str:
    """Decoded text with whitespace collapsed and lower-cased (for exact-match accuracy)."""
    del example, is_target
    return _plain(_to_str(output))


def postprocess_with_references(output: Any, example: Mapping[str, Any] | None = None,
                                is_target: bool = False) -> str | list[str]:
    """Predictions: the decoded text. Targets: every reference in the example's `answers`."""
    if is_target and example is not None and "answers" in example:
        return [_to_str(a) for a in np.asarray(example["answers"]).reshape(-1)]
    return _to_str(output).strip()


def postprocess_rank_target(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False):
    """Targets of a rank-classification task: `(idx, is_correct)` of the option's row."""
    if is_target and example is not None:
        return int(example["idx"]), bool(example["is_correct"])
    return output


# ------------------------------------------------------------------ SQuAD


def normalize_squad_answer(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lower, drop punctuation, drop a/an/the, fix spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_squad_answer(prediction) == normalize_squad_answer(reference))


def squad_f1_score(prediction: str, reference: str) -> float:
    """Token-level F1 of the normalised strings (0 when no token is shared), in [0, 1]."""
    pred_tokens = normalize_squad_answer(prediction).split()
    ref_tokens = normalize_squad_answer(reference).split()
    common = collections.Counter(pred_tokens) & collections.Counter(ref_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _mean_percent(values: list[float]) -> float:
    return 100.0 * float(np.mean(values)) if values else 0.0


def squad(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 (percent), each the max over an example's references."""
    _check_lengths(targets, predictions)
    em, f1 = [], []
    for target, prediction in zip(targets, predictions):
        refs = _references(target)
        em.append(max(squad_exact_match(prediction, r) for r in refs))
        f1.append(max(squad_f1_score(prediction, r) for r in refs))
    return {"em": _mean_percent(em), "f1": _mean_percent(f1)}


def squad_f1(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """SQuAD F1 only (percent), e.g. for free-form answers where exact match is rarely met."""
    return {"f1": squad(targets, predictions)["f1"]}


# ------------------------------------------------------------------ accuracy


def accuracy(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """Percent of predictions equal to (one of) their target(s), ignoring case and extra spaces."""
    _check_lengths(targets, predictions)
    hits = [float(any(_plain(prediction) == _plain(r) for r in _references(target)))
            for target, prediction in zip(targets, predictions)]
    return {"accuracy": _mean_percent(hits)}


# ------------------------------------------------------------------ ROUGE


def rouge(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure (percent, mean over examples, best over references); `rouge-score`."""
    _check_lengths(targets, predictions)
    try:
        from rouge_score import rouge_scorer  # imported here: it pulls in nltk (~1 s)
    except ImportError as e:
        raise ImportError("metrics.qa.rouge needs the rouge-score package: pip install rouge-score==0.1.2") from e
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = {key: [] for key in ROUGE_TYPES}
    for target, prediction in zip(targets, predictions):
        scores = [scorer.score(reference, prediction) for reference in _references(target)]
        for key in ROUGE_TYPES:
            totals[key].append(max(s[key].fmeasure for s in scores))
    return {key: _mean_percent(values) for key, values in totals.items()}


# ------------------------------------------------------------------ rank classification


def rank_classification_predictions(option_scores: Sequence[Sequence[float]]) -> np.ndarray:
    """For each example, the index of its highest-scoring option (the first one on ties).

    `option_scores[i]` holds example i's option scores (e.g. log-likelihoods); examples may have
    different numbers of options. NaN scores never win.
    """
    best = []
    for i, scores in enumerate(option_scores):
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 1 or scores.size == 0:
            raise ValueError(f"Example {i}: option scores must be a non-empty 1-D list, got shape {scores.shape}.")
        scores = np.where(np.isnan(scores), -np.inf, scores)
        best.append(int(np.argmax(scores)))
    return np.asarray(best, dtype=np.int64)


def rank_classification_accuracy(
    option_scores: Sequence[Sequence[float]], correct_indices: Sequence[int]
) -> dict[str, float]:
    """Percent of examples whose highest-scoring option is the correct one."""
    _check_lengths(correct_indices, option_scores)
    predicted = rank_classification_predictions(option_scores)
    for i, (scores, correct) in enumerate(zip(option_scores, correct_indices)):
        if not 0 <= int(correct) < len(scores):
            raise ValueError(f"Example {i}: correct option {correct} is out of range for {len(scores)} options.")
    hits = (predicted == np.asarray(correct_indices, dtype=np.int64)).astype(np.float64)
    return {"accuracy": _mean_percent(hits.tolist())}


def rank_classification(targets: Sequence[tuple[int, bool]], scores: Sequence[float]) -> dict[str, float]:
    """seqio score metric over one row per (example, option): `targets[j] = (idx, is_correct)`.

    Rows are grouped by `idx` (e.g. from `unifiedqa.multiple_choice_rank_classification`); an
    example counts as right when its highest-scoring row is a correct one.
    """
    _check_lengths(targets, scores)
    groups: dict[int, list[tuple[float, bool]]] = collections.defaultdict(list)
    for (idx, is_correct), score in zip(targets, scores):
        groups[int(idx)].append((float(score), bool(is_correct)))
    rows_per_example = list(groups.values())
    best = rank_classification_predictions([[score for score, _ in rows] for rows in rows_per_example])
    hits = [float(rows[b][1]) for rows, b in zip(rows_per_example, best)]
    return {"accuracy": _mean_percent(hits)}
