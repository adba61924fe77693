"""Pre-training tasks over the corpus shipped in `t5x_lite/data/bundled` (offline).

| task | objective | TASK_FEATURE_LENGTHS | feature converter |
| --- | --- | --- | --- |
| `bundled_span_corruption` | T5 span corruption | inputs, targets | `seqio.EncDecFeatureConverter` |
| `bundled_mlm` | BERT MLM, no NSP | inputs == targets | `MaskedLMFeatureConverter` |
| `bundled_mlm_nsp` | BERT MLM + next-sentence pairs | inputs == targets | `MaskedLMFeatureConverter` |
| `bundled_lm` | causal LM | targets | `seqio.DecoderFeatureConverter` |
| `bundled_prefix_lm` | prefix LM | inputs, targets | `seqio.DecoderFeatureConverter` |
| `bundled_bart_denoising` | BART | inputs, targets | `seqio.EncDecFeatureConverter` |
"""

import seqio

from t5x_lite.data import registration, sources

SPLITS = {"train": str(sources.BUNDLED_DIR / "train.txt"), "validation": str(sources.BUNDLED_DIR / "validation.txt")}


def _register() -> None:
    for objective in registration.OBJECTIVES:
        if f"bundled_{objective}" not in seqio.TaskRegistry.names():
            registration.register_family_task(f"bundled_{objective}", objective, SPLITS)


_register()
