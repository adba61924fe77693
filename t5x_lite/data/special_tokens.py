"""Special token ids for the BERT and BART objectives, and per-id lookup tables over a vocabulary.

The bundled SentencePiece vocabulary (like T5's) has only pad=0, eos=1 and unk=2 besides its
pieces; it has no [MASK], [CLS] or [SEP]. `bert_special_ids` is the one place that assigns them,
from the vocabulary's extra ids counted down from the top (T5's sentinel order):

  [MASK] = <extra_id_0> = vocab_size - 1   (BERT's mask and BART's infilling mask)
  [CLS]  = <extra_id_1> = vocab_size - 2
  [SEP]  = <extra_id_2> = vocab_size - 3

With the bundled vocabulary (8000 pieces + 100 extra ids) that is 8099, 8098 and 8097.

UL2's mode tokens (`ul2_mode_ids`) are the LOWEST three extra ids, so that span-corruption sentinels,
which count down from the top, reach them only after all the others:

  [NLU] = <extra_id_{E-1}>,  [NLG] = <extra_id_{E-2}>,  [S2S] = <extra_id_{E-3}>   (E extra ids)

With the bundled vocabulary: 8000, 8001 and 8002 (`<extra_id_99>`, `<extra_id_98>`, `<extra_id_97>`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import seqio
import tensorflow as tf

NUM_BERT_SPECIAL_IDS = 3


class BertSpecialIds(NamedTuple):
    mask: int
    cls: int
    sep: int


def bert_special_ids(vocabulary: seqio.Vocabulary) -> BertSpecialIds:
    """[MASK], [CLS] and [SEP] ids: the vocabulary's extra ids 0, 1 and 2 (its last three ids)."""
    extra_ids = getattr(vocabulary, "extra_ids", 0) or 0
    if extra_ids < NUM_BERT_SPECIAL_IDS:
        raise ValueError(
            f"The BERT/BART objectives take [MASK], [CLS] and [SEP] from the vocabulary's extra ids, but "
            f"{type(vocabulary).__name__} has {extra_ids}; use a vocabulary with at least "
            f"{NUM_BERT_SPECIAL_IDS} extra ids (e.g. t5x_lite.data.vocab.get_vocabulary(), 100 extra ids)."
        )
    top = vocabulary.vocab_size - 1
    return BertSpecialIds(mask=top, cls=top - 1, sep=top - 2)


UL2_MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")


def ul2_mode_ids(vocabulary: seqio.Vocabulary) -> dict[str, int]:
    """{"[NLU]": id, "[NLG]": id, "[S2S]": id}: the vocabulary's three lowest extra ids (see the module docstring)."""
    extra_ids = getattr(vocabulary, "extra_ids", 0) or 0
    if extra_ids < len(UL2_MODE_TOKENS):
        raise ValueError(
            f"UL2 takes its mode tokens {', '.join(UL2_MODE_TOKENS)} from the vocabulary's extra ids, but "
            f"{type(vocabulary).__name__} has {extra_ids}; use a vocabulary with extra ids (e.g. "
            "t5x_lite.data.vocab.get_vocabulary(), 100 extra ids)."
        )
    lowest = vocabulary.vocab_size - extra_ids
    return {token: lowest + i for i, token in enumerate(UL2_MODE_TOKENS)}


def ordinary_id_range(vocabulary: seqio.Vocabulary) -> tuple[int, int]:
    """`[low, high)`: the ids of ordinary pieces, above pad/eos/unk and below the extra ids.

    Random replacement tokens (BERT's 10%) are drawn from this range, never a special id or sentinel.
    """
    specials = [i for i in (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) if i is not None]
    low = max(specials) + 1
    high = vocabulary.vocab_size - (getattr(vocabulary, "extra_ids", 0) or 0)
    if high <= low:
        raise ValueError(f"{type(vocabulary).__name__} has no ordinary ids between {low} and {high}.")
    return low, high


@tf.autograph.experimental.do_not_convert  # plain Python over 8k pieces: AutoGraph would make it take seconds
def piece_table(vocabulary: seqio.Vocabulary, predicate: Callable[[str], bool], purpose: str) -> tf.Tensor:
    """A bool [vocab_size] tensor, True at ids whose SentencePiece piece satisfies `predicate`.

    Extra ids and ids outside the SentencePiece model are False. `purpose` names the caller in
    the error raised for a vocabulary that is not SentencePiece.
    """
    tokenizer = getattr(vocabulary, "tokenizer", None)
    if not isinstance(vocabulary, seqio.SentencePieceVocabulary) or tokenizer is None:
        raise ValueError(
            f"{purpose} needs a SentencePiece vocabulary to read pieces from, got {type(vocabulary).__name__}; "
            "use t5x_lite.data.vocab.get_vocabulary() or turn the option off."
        )
    table = np.zeros([vocabulary.vocab_size], bool)
    table[: tokenizer.get_piece_size()] = [predicate(tokenizer.id_to_piece(i)) for i in range(tokenizer.get_piece_size())]
    return tf.constant(table)


def word_start_table(vocabulary: seqio.Vocabulary) -> tf.Tensor:
    """True at pieces that begin a word: SentencePiece marks a preceding space with '▁'."""
    return piece_table(vocabulary, lambda piece: piece.startswith("\u2581"), "whole-word masking")


SENTENCE_END_CHARACTERS = (".", "!", "?")


def sentence_end_table(vocabulary: seqio.Vocabulary) -> tf.Tensor:
    """True at pieces that end a sentence: those ending in '.', '!' or '?' (e.g. '.', '▁3.')."""
    return piece_table(vocabulary, lambda piece: piece.endswith(SENTENCE_END_CHARACTERS), "sentence permutation")
