"""UnifiedQA fine-tuning tasks: the bundled QA sets, their mixture, SQuAD and BoolQ.

All text-to-text (`inputs`/`targets`, bundled vocabulary):

| name | data | metrics |
| --- | --- | --- |
| `bundled_qa_extractive` | `bundled/qa/extractive_{train,validation}.jsonl` | SQuAD `em`, `f1` |
| `bundled_qa_abstractive` | `bundled/qa/abstractive_*.jsonl` | `rouge1`, `rouge2`, `rougeL`, SQuAD `f1` |
| `bundled_qa_multiple_choice` | `bundled/qa/multiple_choice_*.jsonl` | `accuracy` |
| `bundled_qa_yes_no` | `bundled/qa/yes_no_*.jsonl` | `accuracy` |
| `bundled_qa_multiple_choice_rank` | the multiple-choice files, one row per option (rank classification) | `accuracy` |
| `bundled_qa_yes_no_rank` | the yes/no files, two rows per question (`yes`, `no`: rank classification) | `accuracy` |
| `bundled_qa_mixture` | the four formats, examples-proportional (`qa_mixing_rate`) | each task's |
| `bundled_qa_without_<format>` | the three formats but `<format>`, as the mixture: train on them, evaluate zero-shot on the fourth | each task's |
| `squad_v1_1_unifiedqa` | TFDS `squad/v1.1:3.0.0` (extractive, every reference answer kept) | SQuAD `em`, `f1` |
| `boolq_unifiedqa` | TFDS `super_glue/boolq:1.0.2` (yes/no) | `accuracy` |

The TFDS tasks read data prepared beforehand (`--tfds_data_dir`); absent data fails at once, offline.
"""

import seqio

from t5x_lite.data import registration, sources
from t5x_lite.data.preprocessors import unifiedqa

QA_DIR = sources.BUNDLED_DIR / "qa"
BUNDLED_FORMATS = unifiedqa.FORMATS
BUNDLED_MIXTURE = "bundled_qa_mixture"
SQUAD_TFDS_NAME = "squad/v1.1:3.0.0"
BOOLQ_TFDS_NAME = "super_glue/boolq:1.0.2"


def _files(format: str) -> dict[str, str]:
    return {split: str(QA_DIR / f"{format}_{split}.jsonl") for split in ("train", "validation")}


def _tfds(tfds_name: str) -> sources.PreparedTfdsDataSource:
    return sources.PreparedTfdsDataSource(tfds_name=tfds_name, splits=("train", "validation"))


def leave_one_out_mixture(held_out: str) -> str:
    """The name of the mixture of the bundled QA formats but `held_out` (one of `BUNDLED_FORMATS`)."""
    unifiedqa.check_format(held_out)
    return f"bundled_qa_without_{held_out}"


def _register_mixtures() -> None:
    """`bundled_qa_mixture` and its leave-one-out mixtures, examples-proportional (`qa_mixing_rate`)."""
    mixtures = {BUNDLED_MIXTURE: BUNDLED_FORMATS,
                **{leave_one_out_mixture(f): [g for g in BUNDLED_FORMATS if g != f] for f in BUNDLED_FORMATS}}
    for name, formats in mixtures.items():
        if name not in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.add(name, [f"bundled_qa_{f}" for f in formats], default_rate=registration.qa_mixing_rate)


def _register() -> None:
    names = set(seqio.TaskRegistry.names())
    for format in BUNDLED_FORMATS:
        if f"bundled_qa_{format}" not in names:
            registration.add_qa_task(f"bundled_qa_{format}", sources.QaFileDataSource(_files(format), format), format)
    if "bundled_qa_multiple_choice_rank" not in names:
        source = sources.QaFileDataSource(_files("multiple_choice"), "multiple_choice")
        registration.register_rank_classification_task("bundled_qa_multiple_choice_rank", source)
    if "bundled_qa_yes_no_rank" not in names:
        source = sources.QaFileDataSource(_files("yes_no"), "yes_no")
        registration.register_rank_classification_task("bundled_qa_yes_no_rank", source, format="yes_no")
    _register_mixtures()
    if "squad_v1_1_unifiedqa" not in names:
        registration.add_qa_task("squad_v1_1_unifiedqa", _tfds(SQUAD_TFDS_NAME), "extractive", [unifiedqa.squad_to_records])
    if "boolq_unifiedqa" not in names:
        registration.add_qa_task("boolq_unifiedqa", _tfds(BOOLQ_TFDS_NAME), "yes_no", [unifiedqa.boolq_to_records])


_register()
