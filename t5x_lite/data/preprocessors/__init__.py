"""SeqIO preprocessors, one module per objective or text format: `span_corruption` (T5), `bart_noise`, `mlm` (BERT,
optionally with next-sentence pairs), `lm` (causal and prefix LM), `ul2` (UL2's mixture of denoisers), `unifiedqa` (text-to-text QA and rank
classification rows), `classification` (BERT inputs for classification and tagging), `objective_space` (AANG's D/T/R/O combinations), and `text`, the steps they share.
"""
