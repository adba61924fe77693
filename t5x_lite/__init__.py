"""t5x_lite: pre-training and fine-tuning transformer language models with JAX, Flax and SeqIO.

Importing the package imports nothing else (no TensorFlow, no seqio) and registers nothing:
`import t5x_lite.tasks` registers the bundled seqio tasks (the CLI does so on the first task lookup).
`t5x_lite.load(path)` (the Python API, `t5x_lite/api.py`) imports what it needs when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from t5x_lite.api import Model

__version__ = "0.1.0"


def load(path: str, gin: Sequence[str] = ()) -> Model:
    """A checkpoint as a `t5x_lite.api.Model` (predict, score, train, evaluate, save); see `t5x_lite.api.load`."""
    from t5x_lite import api

    return api.load(path, gin)
