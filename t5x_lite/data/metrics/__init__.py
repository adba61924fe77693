"""Postprocessors and metric functions (seqio's `fn(targets, predictions) -> dict`), pure Python and numpy.

`qa`: SQuAD EM/F1, accuracy, ROUGE, rank classification and the QA postprocessors;
`classification`: accuracy/macro F1, BIO entity F1 and the label/tag postprocessors.
"""
