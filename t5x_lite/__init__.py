"""t5x_lite: pre-training and fine-tuning transformer language models with JAX, Flax and SeqIO.

Importing the package registers the bundled seqio tasks and the gin configurables of the
model families.
"""

from t5x_lite.data import tasks  # noqa: F401
from t5x_lite.models import encoder_decoder  # noqa: F401
from t5x_lite.training import freezing  # noqa: F401
from t5x_lite.data import qa_tasks  # noqa: F401
from t5x_lite.data import family_tasks  # noqa: F401
from t5x_lite.data import classification_tasks  # noqa: F401
from t5x_lite.models import encoder_only  # noqa: F401
from t5x_lite.models import bart, decoder_only  # noqa: F401
