"""Vocabularies for t5x_lite tasks: SentencePiece (the bundled 8k model or any `.model` file) and label names.

The bundled model (trained by `tools/train_vocab.py` on `bundled/train.txt`) follows T5's id
conventions: pad=0, eos=1, unk=2, no BOS; the `extra_ids` sentinels are appended on top, so
`<extra_id_0>` is the last id. In gin: `get_vocabulary.spm_path = "/path/to/spiece.model"`.
`LabelVocabulary` is the `targets` vocabulary of the classification and tagging tasks.
"""

import pathlib
from collections.abc import Sequence

import gin
import seqio

from t5x_lite import storage

BUNDLED_SPM_PATH: str = str(pathlib.Path(__file__).resolve().parent / "bundled" / "spiece.model")
DEFAULT_EXTRA_IDS = 100


@gin.configurable
def get_vocabulary(spm_path: str | None = None, extra_ids: int = DEFAULT_EXTRA_IDS) -> seqio.SentencePieceVocabulary:
    """The SentencePiece model at `spm_path` (a local path or gs://; None: the bundled one) with `extra_ids`
    `<extra_id_N>` sentinels appended (T5 uses 100; `<extra_id_0>` gets the last id); a missing file is a
    FileNotFoundError."""
    path = BUNDLED_SPM_PATH if spm_path is None else spm_path
    if not storage.path(path).is_file():
        raise FileNotFoundError(
            f"SentencePiece model {path!r} does not exist: pass spm_path= the path of an existing "
            f"'.model' file (gin: get_vocabulary.spm_path = '...'), or None for the bundled "
            f"vocabulary {BUNDLED_SPM_PATH!r}."
        )
    return seqio.SentencePieceVocabulary(storage.local_file(path), extra_ids=extra_ids)  # seqio reads local files


class LabelVocabulary(seqio.PassThroughVocabulary):
    """Label or tag ids that pass through unchanged (as metrics want them) and know their names,
    which `t5x_lite.infer` writes. `first_id` is the id of `names[0]` (tags start at 1: 0 means
    "no label")."""

    def __init__(self, names: Sequence[str], first_id: int = 0):
        super().__init__(size=first_id + len(names))
        self.names = tuple(names)
        self.first_id = first_id

    def label_name(self, label_id: int) -> str:
        """The name of one label or tag id; a clear error for an id the task does not define."""
        index = int(label_id) - self.first_id
        if not 0 <= index < len(self.names):
            raise ValueError(
                f"Label id {label_id} is not one of this task's ids {self.first_id}..{self.size - 1} "
                f"({', '.join(self.names)}); does the model's BertConfig.num_labels ({len(self.names)} here) match the task?"
            )
        return self.names[index]

    def __str__(self) -> str:
        return f"LabelVocabulary({', '.join(self.names)}; first id {self.first_id})"
