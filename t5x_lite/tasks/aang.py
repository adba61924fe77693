"""AANG's objective space around the bundled extractive QA task: `aang_<D>_<T>_<R>_<O>`, one task per valid
combination of `objective_stages.combinations()` (57), e.g. `aang_task_mask_bi_denoise` (TAPT's BERT-op),
`aang_general_none_l2r_next` (GPT's), `aang_task_none_l2r_task` (the end task read left to right).

D=task reads `bundled_qa_extractive`'s inputs (its train and validation splits), D=domain the contexts of the
bundled abstractive QA set (scenes of the same plays, without the extractive questions), D=general the bundled
corpus. Train them as auxiliaries of the end-task-aware mode (gin_configs/examples/tartan_aang.gin).
"""

import seqio

from t5x_lite.data import objective_stages, registration
from t5x_lite.tasks import qa

PREFIX = "aang"
END_TASK = "bundled_qa_extractive"


def _register() -> None:
    combinations = [c for c in objective_stages.combinations()
                    if f"{PREFIX}_{c.name}" not in seqio.TaskRegistry.names()]
    files = {split: str(qa.QA_DIR / f"abstractive_{split}.jsonl") for split in ("train", "validation")}
    domain = registration.qa_contexts(files, "abstractive")
    registration.register_objective_space(PREFIX, END_TASK, combinations, domain=domain)


_register()
