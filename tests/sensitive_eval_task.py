"""A QA task whose metrics move with every score and every prediction, registered on import (for tests that
compare an evaluation command with the Python API: a barely trained model's QA metrics are all 0)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import seqio

from t5x_lite.data import pipeline

NAME = "test_qa_mean_score_and_length"


def mean_log_likelihood(targets: Sequence, scores: Sequence[float]) -> dict[str, float]:
    return {"mean_log_likelihood": float(np.mean(scores))}


def mean_prediction_length(targets: Sequence, predictions: Sequence[str]) -> dict[str, float]:
    return {"mean_prediction_chars": float(np.mean([len(p) for p in predictions]))}


if NAME not in seqio.TaskRegistry.names():
    qa = pipeline.get_mixture_or_task("bundled_qa_extractive")
    seqio.TaskRegistry.add(
        NAME, source=qa.source, preprocessors=qa.preprocessors, output_features=qa.output_features,
        postprocess_fn=qa.postprocessor, metric_fns=[mean_log_likelihood, mean_prediction_length],
    )
