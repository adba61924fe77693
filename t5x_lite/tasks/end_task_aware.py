"""Auxiliary tasks of end-task-aware training over an end task's own inputs (TAPT data):
`bundled_qa_extractive_inputs_<objective>` for span corruption, BART denoising and prefix LM over the inputs
(question and scene, no answers) of the bundled extractive QA task's splits (docs/end_task_aware.md).
"""

import seqio

from t5x_lite.data import registration, sources
from t5x_lite.tasks import qa

TAPT_OBJECTIVES = ("span_corruption", "bart_denoising", "prefix_lm")


def _register() -> None:
    for objective in TAPT_OBJECTIVES:
        name = f"bundled_qa_extractive_inputs_{objective}"
        if name not in seqio.TaskRegistry.names():
            files = {split: str(qa.QA_DIR / f"extractive_{split}.jsonl") for split in ("train", "validation")}
            source = sources.QaFileDataSource(files, "extractive")
            registration.add_qa_inputs_task(name, source, "extractive", objective)


_register()
