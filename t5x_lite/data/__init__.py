"""SeqIO data for t5x_lite: vocabularies, preprocessors, feature converters, sources, metrics, the pipeline.

| module | holds |
| --- | --- |
| `vocab`, `special_tokens` | SentencePiece and label vocabularies; BERT/BART special ids |
| `preprocessors/` | one module per objective or text format (span corruption, BART noise, MLM, LM, UnifiedQA, ...) |
| `feature_converters` | the converters seqio lacks (MLM, classification, tagging) |
| `sources` | file checks, prepared-TFDS and QA-file data sources |
| `metrics/` | QA and classification/tagging metrics and postprocessors |
| `registration` | helpers that register tasks over your files (importing it registers nothing) |
| `pipeline` | task lookup by name, feature-length checks, `get_dataset` |
| `bundled/` | the bundled corpus, vocabulary, QA and classification files |

Task registrations live apart, in `t5x_lite.tasks`. Nothing here imports models, networks or training.
"""
