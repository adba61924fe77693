"""Hugging Face tokenizers as seqio vocabularies, and back.

- `spiece.model` (T5, mT5) -> `seqio.SentencePieceVocabulary` with the directory's `extra_ids`
  (T5's 100 `<extra_id_N>` sentinels live in the tokenizer, not in `spiece.model`);
- `tokenizer.json` (WordPiece, BPE, Unigram from the `tokenizers` package) -> `TokenizersVocabulary`,
  a seqio `Vocabulary` that SeqIO tasks can tokenize with (eagerly and inside tf.data).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf
import tokenizers
from etils import epath

from t5x_lite import storage

SPIECE = "spiece.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
T5_DEFAULT_EXTRA_IDS = 100  # transformers' T5Tokenizer default when the directory does not say


class TokenizersVocabulary(seqio.Vocabulary):
    """A `tokenizer.json` (Hugging Face `tokenizers`) as a seqio vocabulary.

    Ids are the tokenizer's own; encoding adds no special tokens (seqio's features append EOS), and
    decoding stops at EOS and skips special tokens, as `tokenizer.decode(ids, skip_special_tokens=True)`.
    Inside tf.data the tokenizer runs through `tf.py_function` (the Rust tokenizer, one call per example).

    seqio pads with id 0 (`pad_id` is 0 whatever the tokenizer's pad token is: BART's `<pad>` is 1):
    its feature converters give id 0 no loss, pack examples by non-zero ids and drop it when decoding.
    That is harmless where id 0 is a special token that text never encodes to (BERT's `[PAD]`, T5's
    `<pad>`, BART's `<s>`), but GPT-2 gives id 0 to the ordinary token "!": such a vocabulary encodes
    in Python (`encode`) but refuses to tokenize inside a seqio pipeline (`encode_tf`).
    """

    def __init__(
        self,
        tokenizer_file: str,
        *,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
    ):
        self.tokenizer_file = str(tokenizer_file)
        self.tokenizer = tokenizers.Tokenizer.from_file(self.tokenizer_file)
        self._tokens = {"eos": eos_token, "unk": unk_token, "pad": pad_token}
        self._ids = {kind: self._token_id(token) for kind, token in self._tokens.items()}
        super().__init__(extra_ids=0)

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"Special token {token!r} is not in the vocabulary of {self.tokenizer_file}.")
        return token_id

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk"]

    @property
    def pad_id(self) -> int:
        """seqio's padding id, 0 (the tokenizer's own pad token, if any, is in `special_tokens`)."""
        return 0

    def _check_id_zero_is_special(self) -> None:
        """Raises if id 0 is an ordinary token, which seqio would take for padding."""
        added = self.tokenizer.get_added_tokens_decoder()
        if 0 not in added or not added[0].special:
            raise ValueError(
                f"{self.tokenizer_file} gives id 0 to the ordinary token {self.tokenizer.id_to_token(0)!r} (GPT-2's "
                "tokenizer does), but seqio uses id 0 for padding: its feature converters would give that token no "
                "loss, cut packed examples at it and drop it when decoding. This vocabulary can encode in Python "
                "(`encode`, e.g. prompts for `predict_batch`) but not inside a seqio task; use a tokenizer whose id 0 "
                "is a special token (such as a pad token) for seqio tasks."
            )

    @property
    def special_tokens(self) -> dict[str, str | None]:
        """{"eos": ..., "unk": ..., "pad": ...} token strings (None when the tokenizer has none)."""
        return dict(self._tokens)

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """A scalar string -> [n] int32 ids; a [b] batch -> a ragged [b, None] tensor."""

        def encode(batch: tf.Tensor):
            texts = [x.decode("utf-8") for x in batch.numpy()]
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
            lengths = np.array([len(e.ids) for e in encodings], np.int64)
            flat = np.array([i for e in encodings for i in e.ids], np.int32)
            return flat, lengths

        self._check_id_zero_is_special()
        batch = tf.reshape(s, [-1])
        flat, lengths = tf.py_function(encode, [batch], (tf.int32, tf.int64))
        flat.set_shape([None])
        if s.shape.rank == 0:
            return flat
        return tf.RaggedTensor.from_row_lengths(flat, tf.ensure_shape(lengths, [None]))

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """[n] ids -> a scalar string; [b, n] -> [b] strings (pads and post-EOS ids removed by seqio)."""
        pad_id = self.pad_id

        def decode(batch: tf.Tensor):
            rows = [[i for i in row if i != pad_id] for row in batch.numpy().tolist()]
            return np.array([s.encode("utf-8") for s in self.tokenizer.decode_batch(rows, skip_special_tokens=True)])

        ids = tf.convert_to_tensor(ids)
        rank = ids.shape.rank
        texts = tf.py_function(decode, [tf.reshape(ids, [-1, tf.shape(ids)[-1]])], tf.string)
        return tf.reshape(texts, []) if rank == 1 else tf.ensure_shape(texts, [None])

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, TokenizersVocabulary)
            and self._tokens == other._tokens
            and self.tokenizer.to_str() == other.tokenizer.to_str()
        )

    def __hash__(self) -> int:
        return hash(hashlib.md5(self.tokenizer.to_str().encode()).hexdigest())

    def __str__(self) -> str:
        return f"TokenizersVocabulary(file={self.tokenizer_file}, size={self.vocab_size}, eos_id={self.eos_id})"


def _token_string(value) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    return value.get("content") if isinstance(value, Mapping) else value


def _tokenizer_config(folder: epath.Path) -> dict:
    config = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):  # tokenizer_config.json wins
        if (folder / name).is_file():
            config.update(json.loads((folder / name).read_text(encoding="utf-8")))
    return config


def _extra_ids(config: Mapping) -> int:
    """T5 sentinels: `extra_ids`, else the number of `<extra_id_N>` special tokens, else T5's default 100."""
    if config.get("extra_ids") is not None:
        return int(config["extra_ids"])
    listed = [*config.get("additional_special_tokens", []), *config.get("extra_special_tokens", [])]
    sentinels = [t for t in map(_token_string, listed) if t and re.fullmatch(r"<extra_id_\d+>", t)]
    return len(sentinels) if sentinels else T5_DEFAULT_EXTRA_IDS


@gin.configurable(module="t5x_lite.hf")
def load_vocabulary(path: str) -> seqio.Vocabulary:
    """The vocabulary of a Hugging Face model directory: `spiece.model` first, else `tokenizer.json`.

    In gin, e.g. `get_vocabulary`'s place in a task: `@hf.load_vocabulary()` with
    `hf.load_vocabulary.path = '/models/flan-t5-small'`.
    """
    folder = storage.path(path).expanduser()  # local or gs:// (the tokenizer libraries read local copies)
    config = _tokenizer_config(folder)
    if (folder / SPIECE).is_file():
        return seqio.SentencePieceVocabulary(storage.local_file(str(folder / SPIECE)), extra_ids=_extra_ids(config))
    if (folder / TOKENIZER_JSON).is_file():
        eos = _token_string(config.get("eos_token")) or _token_string(config.get("sep_token"))
        return TokenizersVocabulary(
            storage.local_file(str(folder / TOKENIZER_JSON)),
            eos_token=eos,
            unk_token=_token_string(config.get("unk_token")),
            pad_token=_token_string(config.get("pad_token")),
        )
    raise FileNotFoundError(
        f"{str(path)!r} has no tokenizer: expected {SPIECE} (SentencePiece) or {TOKENIZER_JSON} (tokenizers)."
    )


def save_vocabulary(vocabulary: seqio.Vocabulary, path: str | os.PathLike) -> list[str]:
    """Writes tokenizer files that `transformers.AutoTokenizer.from_pretrained(path)` loads (into a local or gs://
    folder); returns their names."""
    folder = storage.path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        # The original file: seqio's in-memory model has the sentinels added as pieces already.
        (folder / SPIECE).write_bytes(storage.path(vocabulary.sentencepiece_model_file).read_bytes())
        piece = vocabulary.tokenizer.id_to_piece
        config = {
            "tokenizer_class": "T5Tokenizer",
            "extra_ids": vocabulary.extra_ids,
            "eos_token": piece(vocabulary.eos_id),
            "unk_token": piece(vocabulary.unk_id),
            "pad_token": piece(vocabulary.pad_id),
        }
        files = [SPIECE, TOKENIZER_CONFIG]
    elif isinstance(vocabulary, TokenizersVocabulary):
        (folder / TOKENIZER_JSON).write_text(vocabulary.tokenizer.to_str(pretty=True), encoding="utf-8")
        tokens = vocabulary.special_tokens
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update({f"{kind}_token": token for kind, token in tokens.items() if token is not None})
        files = [TOKENIZER_JSON, TOKENIZER_CONFIG]
    else:
        raise TypeError(
            f"Cannot write a {type(vocabulary).__name__} as Hugging Face tokenizer files; supported: "
            "seqio.SentencePieceVocabulary and t5x_lite.hf.TokenizersVocabulary."
        )
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return files
