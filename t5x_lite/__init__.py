"""t5x_lite: pre-training and fine-tuning transformer language models with JAX, Flax and SeqIO.

Importing the package imports nothing else (no TensorFlow, no seqio) and registers nothing:
`import t5x_lite.tasks` registers the bundled seqio tasks (the CLI does so on the first task lookup).
"""

__version__ = "0.1.0"
