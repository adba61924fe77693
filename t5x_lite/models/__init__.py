"""Trainer adapters of the model families; importing the package registers their gin configurables."""

from t5x_lite.models import causal, electra, encoder, permutation_lm, seq2seq  # noqa: F401
