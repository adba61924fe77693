"""Registered pre-training tasks of the BERT, GPT, prefix-LM and BART families.

Importing this module (or `t5x_lite`) registers, over the bundled corpus (offline) and over TFDS
`c4/en` (prepared beforehand, `--tfds_data_dir`; absent data fails at once):

| task | objective | TASK_FEATURE_LENGTHS | feature converter |
| --- | --- | --- | --- |
| `bundled_mlm`, `c4_mlm` | BERT MLM, no NSP (`t5x_lite.data.mlm`) | inputs == targets | `MaskedLMFeatureConverter` |
| `bundled_mlm_nsp`, `c4_mlm_nsp` | BERT MLM + next-sentence pairs | inputs == targets | `MaskedLMFeatureConverter` |
| `bundled_lm`, `c4_lm` | causal LM (`t5x_lite.data.lm`) | targets | `seqio.DecoderFeatureConverter` |
| `bundled_prefix_lm`, `c4_prefix_lm` | prefix LM | inputs, targets | `seqio.DecoderFeatureConverter` |
| `bundled_bart_denoising`, `c4_bart_denoising` | BART (`t5x_lite.data.bart`) | inputs, targets | `seqio.EncDecFeatureConverter` |

`register_family_task` registers one of these objectives over your own text files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

from t5x_lite.data import bart, lm, mlm, tasks, vocab


def _features(names: Sequence[str], add_eos: bool, vocabulary: seqio.Vocabulary | None) -> dict[str, seqio.Feature]:
    vocabulary = vocabulary or vocab.get_vocabulary()
    return {name: seqio.Feature(vocabulary=vocabulary, add_eos=add_eos) for name in names}


# objective -> (preprocessors over a `text` field, output features for a vocabulary).
OBJECTIVES: dict[str, tuple[Callable[[], list], Callable[[seqio.Vocabulary | None], dict[str, seqio.Feature]]]] = {
    "mlm": (mlm.mlm_preprocessors, lambda v: _features(["inputs", "targets"], False, v)),
    "mlm_nsp": (
        lambda: mlm.mlm_preprocessors(next_sentence_prediction=True),
        lambda v: _features(["inputs", "targets"], False, v),
    ),
    "lm": (lm.lm_preprocessors, lambda v: _features(["targets"], False, v)),
    "prefix_lm": (lm.prefix_lm_preprocessors, lambda v: _features(["inputs", "targets"], False, v)),
    "bart_denoising": (bart.bart_preprocessors, lambda v: _features(["inputs", "targets"], True, v)),
}


def _objective(name: str) -> tuple[Callable[[], list], Callable]:
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; pick one of {sorted(OBJECTIVES)}.")
    return OBJECTIVES[name]


def register_family_task(
    name: str,
    objective: str,
    split_to_filepattern: Mapping[str, str | Sequence[str]],
    vocabulary: seqio.Vocabulary | None = None,
) -> seqio.Task:
    """Registers `objective` ("mlm", "mlm_nsp", "lm", "prefix_lm", "bart_denoising") over text files.

    One document per line, as `tasks.register_span_corruption_task`. Example:
    `register_family_task("my_mlm", "mlm", {"train": "/data/train*.txt", "validation": "/data/valid.txt"})`.
    """
    preprocessors, output_features = _objective(objective)
    for split, pattern in split_to_filepattern.items():
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        if not any(tf.io.gfile.glob(p) for p in patterns):
            raise FileNotFoundError(f"Task {name!r}: no file matches {pattern!r} for split {split!r}.")
    return seqio.TaskRegistry.add(
        name,
        source=seqio.TextLineDataSource(split_to_filepattern=dict(split_to_filepattern)),
        preprocessors=[tasks.lines_to_text_examples, *preprocessors()],
        output_features=output_features(vocabulary),
        metric_fns=[],
    )


def _register_defaults() -> None:
    bundled = {"train": str(tasks.BUNDLED_DIR / "train.txt"), "validation": str(tasks.BUNDLED_DIR / "validation.txt")}
    for objective, (preprocessors, output_features) in OBJECTIVES.items():
        if f"bundled_{objective}" not in seqio.TaskRegistry.names():
            register_family_task(f"bundled_{objective}", objective, bundled)
        if f"c4_{objective}" not in seqio.TaskRegistry.names():
            seqio.TaskRegistry.add(
                f"c4_{objective}",
                source=tasks.PreparedTfdsDataSource(tfds_name=tasks.C4_TFDS_NAME, splits=("train", "validation")),
                preprocessors=preprocessors(),
                output_features=output_features(None),
                metric_fns=[],
            )


_register_defaults()
