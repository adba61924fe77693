"""SeqIO preprocessors, one module per objective or text format.

| module | what it builds |
| --- | --- |
| `span_corruption` | T5's span corruption (inputs with sentinels, targets with the spans) |
| `bart_noise` | BART's denoising (text infilling, sentence permutation, ...) |
| `mlm` | BERT's masked LM, optionally with next-sentence pairs |
| `lm` | causal and prefix LM chunks |
| `unifiedqa` | UnifiedQA's text-to-text QA formats and rank classification rows |
| `classification` | BERT inputs for sequence classification and token tagging |
| `text` | the shared steps: lines to examples, TSV fields, token-stream chunks, EOS fitting |
"""
