"""t5x_lite: pre-training and fine-tuning transformer language models with JAX, Flax and SeqIO.

Importing the package registers the bundled seqio tasks and the gin configurables of the
model families.
"""

from t5x_lite.data import (
    classification_tasks,  # noqa: F401
    family_tasks,  # noqa: F401
    qa_tasks,  # noqa: F401
    tasks,  # noqa: F401
)
from t5x_lite.models import (  # noqa: F401
    bart,
    decoder_only,
    encoder_decoder,
    encoder_only,
)
from t5x_lite.training import freezing  # noqa: F401
