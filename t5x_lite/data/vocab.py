"""SentencePiece vocabularies for t5x_lite tasks: the bundled 8k model or any `.model` file.

The bundled model (trained by `tools/train_vocab.py` on `bundled/train.txt`) follows T5's id
conventions: pad=0, eos=1, unk=2, no BOS; the `extra_ids` sentinels are appended on top, so
`<extra_id_0>` is the last id. In gin: `get_vocabulary.spm_path = "/path/to/spiece.model"`.
"""

import pathlib

import gin
import seqio
import tensorflow as tf

BUNDLED_SPM_PATH: str = str(pathlib.Path(__file__).resolve().parent / "bundled" / "spiece.model")
DEFAULT_EXTRA_IDS = 100


@gin.configurable
def get_vocabulary(spm_path: str | None = None, extra_ids: int = DEFAULT_EXTRA_IDS) -> seqio.SentencePieceVocabulary:
    """Returns a SentencePiece vocabulary with `extra_ids` sentinel ids appended.

    Args:
      spm_path: a SentencePiece `.model` file (local or any `tf.io.gfile` path); None means the
        bundled model, `BUNDLED_SPM_PATH`.
      extra_ids: number of `<extra_id_N>` sentinels (T5 uses 100); `<extra_id_0>` gets the last id.

    Raises:
      FileNotFoundError: if `spm_path` does not exist.
    """
    path = BUNDLED_SPM_PATH if spm_path is None else spm_path
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"SentencePiece model {path!r} does not exist: pass spm_path= the path of an existing "
            f"'.model' file (gin: get_vocabulary.spm_path = '...'), or None for the bundled "
            f"vocabulary {BUNDLED_SPM_PATH!r}."
        )
    return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
