"""Pre-training tasks over TFDS `c4/en` (prepared beforehand, `--tfds_data_dir`; absent data fails at once).

`c4_<objective>` for each of `registration.OBJECTIVES` (`c4_span_corruption`, `c4_mlm`, `c4_mlm_nsp`,
`c4_lm`, `c4_prefix_lm`, `c4_bart_denoising`), as their `bundled_*` twins.
"""

import seqio

from t5x_lite.data import registration, sources

C4_TFDS_NAME = "c4/en:3.1.0"


def _register() -> None:
    for objective, (preprocessors, output_features) in registration.OBJECTIVES.items():
        if f"c4_{objective}" not in seqio.TaskRegistry.names():
            seqio.TaskRegistry.add(
                f"c4_{objective}",
                source=sources.PreparedTfdsDataSource(tfds_name=C4_TFDS_NAME, splits=("train", "validation")),
                preprocessors=preprocessors(),
                output_features=output_features(None),
                metric_fns=[],
            )


_register()
