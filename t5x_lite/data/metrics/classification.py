"""Classification and tagging metrics (percent), and the postprocessors that feed them label/tag ids.

Pure Python and numpy: no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def postprocess_label(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False) -> int:
    """A decoded `[label id]` (target or prediction) -> the int label id."""
    del example, is_target
    return int(np.asarray(output).reshape(-1)[0])


def postprocess_tags(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False) -> list[int]:
    """Tag ids at the labelled positions (those whose gold tag id is > 0) of the example."""
    tags = np.asarray(output).reshape(-1)
    if example is None:
        return [int(t) for t in tags if t > 0]
    labelled = np.flatnonzero(np.asarray(example["targets"]).reshape(-1) > 0)
    return [int(tags[i]) if i < len(tags) else 0 for i in labelled]


def classification_metrics(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-averaged F1 over the classes present in targets or predictions (percent)."""
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions.")
    t, p = np.asarray(targets), np.asarray(predictions)
    f1s = []
    for label in np.union1d(t, p):
        tp = np.sum((p == label) & (t == label))
        denominator = np.sum(p == label) + np.sum(t == label)
        f1s.append(2 * tp / denominator if denominator else 0.0)
    return {"accuracy": 100.0 * float(np.mean(t == p)) if len(t) else 0.0,
            "macro_f1": 100.0 * float(np.mean(f1s)) if f1s else 0.0}


def bio_spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) of the entities in a BIO tag sequence; an I-X without its B-X starts one."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        if start is not None and not (prefix == "I" and label == kind):
            spans.add((start, i, kind))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, label
    return spans


def tagging_metrics_fn(tag_names: Sequence[str]) -> Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], dict]:
    """A seqio metric: entity-level precision/recall/F1 (exact spans, BIO) and token accuracy (percent)."""

    def tagging_metrics(targets: Sequence[Sequence[int]], predictions: Sequence[Sequence[int]]) -> dict[str, float]:
        def names(ids):
            return [tag_names[i - 1] if 1 <= i <= len(tag_names) else "O" for i in ids]

        found = correct = gold = tokens = right = 0
        for target, prediction in zip(targets, predictions, strict=True):
            gold_spans, predicted_spans = bio_spans(names(target)), bio_spans(names(prediction))
            gold, found, correct = gold + len(gold_spans), found + len(predicted_spans), correct + len(gold_spans & predicted_spans)
            tokens += len(target)
            right += sum(a == b for a, b in zip(target, prediction))
        precision = correct / found if found else 0.0
        recall = correct / gold if gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"f1": 100 * f1, "precision": 100 * precision, "recall": 100 * recall,
                "accuracy": 100 * right / tokens if tokens else 0.0}

    return tagging_metrics
