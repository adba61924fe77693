"""Pre-training tasks over the corpus shipped in `t5x_lite/data/bundled` (offline): `bundled_<objective>` for each
of `registration.OBJECTIVES`. docs/objectives.md gives each one's TASK_FEATURE_LENGTHS and feature converter
(`bundled_span_corruption`: inputs and targets, `seqio.EncDecFeatureConverter`).
"""

import seqio

from t5x_lite.data import registration, sources

SPLITS = {"train": str(sources.BUNDLED_DIR / "train.txt"), "validation": str(sources.BUNDLED_DIR / "validation.txt")}


def _register() -> None:
    for objective in registration.OBJECTIVES:
        if f"bundled_{objective}" not in seqio.TaskRegistry.names():
            registration.register_family_task(f"bundled_{objective}", objective, SPLITS)


_register()
