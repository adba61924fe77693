"""SeqIO data for t5x_lite: vocabularies (`vocab`, `special_tokens`), `preprocessors/`, the `feature_converters`
seqio lacks, data `sources`, `metrics/`, `objective_stages` (the
options and rules of AANG's objective space), `registration` (helpers that register tasks over your files; importing it
registers nothing) and the `pipeline` from a task name to batches; `bundled/` holds the corpus, the vocabulary and
the QA and classification files.

Task registrations live apart, in `t5x_lite.tasks`. Nothing here imports models, networks or training.
"""
