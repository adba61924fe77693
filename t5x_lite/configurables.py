"""Imports every module whose gin configurables a gin file may name, so an entry point can parse any gin file.

Model families (`@EncoderDecoderModel`, `@T5Config`, `@BertConfig`, ...), freezing (`@selective`) and the
data options (`span_corruption.*`, `fit_to_length.*`, `qa_mixing_rate.*`, `@text_files_task()`, `@token_limited_task()`, ...).
`import t5x_lite` stays free of these imports; the bundled tasks register on the first task lookup.
"""

import t5x_lite.models  # noqa: F401  (the trainer adapters and their network configs)
from t5x_lite.data import pipeline, registration, token_limit  # noqa: F401
from t5x_lite.training import end_task_aware, factored_weights, freezing, weighting  # noqa: F401
