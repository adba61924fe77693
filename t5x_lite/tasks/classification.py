"""Sequence classification and token tagging tasks for encoder-only (BERT) fine-tuning.

| task | data | labels | metrics |
| --- | --- | --- | --- |
| `bundled_cls_single` | `bundled/cls/author_*.tsv`: who wrote the excerpt | `shakespeare`, `milton` | accuracy, macro F1 |
| `bundled_cls_pair` | `bundled/cls/next_*.tsv`: does sentence 2 follow sentence 1? | `random`, `next` | accuracy, macro F1 |
| `bundled_tagging` | `bundled/cls/speakers_*.tsv`: speaker labels and names | `O`, `B-SPK`, `I-SPK`, `B-PER` | entity F1, token accuracy |
| `glue_sst2` | TFDS `glue/sst2:2.0.0` | `negative`, `positive` | accuracy, macro F1 |
| `glue_mnli` | TFDS `glue/mnli:2.0.0` (`validation` = matched, `validation_mismatched`) | `entailment`, `neutral`, `contradiction` | accuracy, macro F1 |
| `glue_rte` | TFDS `glue/rte:2.0.0` | `entailment`, `not_entailment` | accuracy, macro F1 |

(see `bundled/cls/README.md` for how the bundled sets were built). The GLUE tasks read data
prepared beforehand (`--tfds_data_dir`); absent data fails at once, offline. Task features are
those of `preprocessors.classification`; convert them with `ClassificationFeatureConverter` or
`TaggingFeatureConverter`.
"""

import functools

import seqio

from t5x_lite.data import registration, sources
from t5x_lite.data.preprocessors import classification

CLS_DIR = sources.BUNDLED_DIR / "cls"
AUTHOR_LABELS = ("shakespeare", "milton")
NEXT_LABELS = ("random", "next")
SPEAKER_TAGS = ("O", "B-SPK", "I-SPK", "B-PER")
GLUE_TFDS = {
    "glue_sst2": ("glue/sst2:2.0.0", ("sentence",), ("negative", "positive")),
    "glue_mnli": ("glue/mnli:2.0.0", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction")),
    "glue_rte": ("glue/rte:2.0.0", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
}
# seqio split name -> TFDS split (the GLUE test splits have no labels and are not registered).
GLUE_SPLITS = {
    "glue_sst2": {"train": "train", "validation": "validation"},
    "glue_mnli": {"train": "train", "validation": "validation_matched", "validation_mismatched": "validation_mismatched"},
    "glue_rte": {"train": "train", "validation": "validation"},
}


def _files(stem: str) -> dict[str, str]:
    return {split: str(CLS_DIR / f"{stem}_{split}.tsv") for split in ("train", "validation")}


def _register() -> None:
    names = set(seqio.TaskRegistry.names())
    if "bundled_cls_single" not in names:
        registration.register_classification_task("bundled_cls_single", _files("author"), AUTHOR_LABELS)
    if "bundled_cls_pair" not in names:
        registration.register_classification_task("bundled_cls_pair", _files("next"), NEXT_LABELS, pair=True)
    if "bundled_tagging" not in names:
        registration.register_tagging_task("bundled_tagging", _files("speakers"), SPEAKER_TAGS)
    for name, (tfds_name, text_keys, labels) in GLUE_TFDS.items():
        if name not in names:
            source = sources.PreparedTfdsDataSource(tfds_name=tfds_name, splits=GLUE_SPLITS[name])
            fields = functools.partial(classification.select_fields, text_keys=text_keys)
            registration.add_classification_task(name, source, [fields], labels, text_keys)


_register()
