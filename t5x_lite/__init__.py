"""t5x_lite: pre-training and fine-tuning transformer language models with JAX, Flax and SeqIO.

Importing the package imports nothing heavy and registers nothing: the entry points import what they
use, and the bundled seqio tasks register on first lookup by name (or with `import t5x_lite.tasks`).
"""
