"""t5x_lite's own seqio tasks and mixtures; importing this package registers them (a second import does nothing):
`bundled` and `c4` (the pre-training objectives over the bundled corpus, offline, and over TFDS `c4/en`, prepared
beforehand), `qa` (the bundled UnifiedQA sets and their mixture, SQuAD v1.1, BoolQ) and `classification` (the
bundled classification and tagging sets, GLUE SST-2, MNLI and RTE), `end_task_aware` (pre-training objectives
over the bundled extractive QA task's inputs, TAPT auxiliaries) and `aang` (AANG's objective space around that
task: `aang_<D>_<T>_<R>_<O>`).

The CLI imports this package on the first lookup of a task name (`pipeline.get_mixture_or_task`);
Python users `import t5x_lite.tasks`. Tasks over your own files: `t5x_lite.data.registration`.
"""

from t5x_lite.tasks import aang, bundled, c4, classification, end_task_aware, qa  # noqa: F401
