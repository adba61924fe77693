"""Pre-training tasks over TFDS `c4/en` (prepared beforehand, `--tfds_data_dir`; absent data fails at once).

`c4_span_corruption` and `c4_<objective>` for each of `registration.OBJECTIVES` (`c4_mlm`,
`c4_mlm_nsp`, `c4_lm`, `c4_prefix_lm`, `c4_bart_denoising`), as their `bundled_*` twins.
"""

import seqio

from t5x_lite.data import registration, sources
from t5x_lite.data.preprocessors import span_corruption

C4_TFDS_NAME = "c4/en:3.1.0"


def _source() -> sources.PreparedTfdsDataSource:
    return sources.PreparedTfdsDataSource(tfds_name=C4_TFDS_NAME, splits=("train", "validation"))


def _register() -> None:
    if "c4_span_corruption" not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            "c4_span_corruption",
            source=_source(),
            preprocessors=span_corruption.span_corruption_preprocessors(),
            output_features=registration.span_corruption_output_features(),
            metric_fns=[],
        )
    for objective, (preprocessors, output_features) in registration.OBJECTIVES.items():
        if f"c4_{objective}" not in seqio.TaskRegistry.names():
            seqio.TaskRegistry.add(
                f"c4_{objective}",
                source=_source(),
                preprocessors=preprocessors(),
                output_features=output_features(None),
                metric_fns=[],
            )


_register()
