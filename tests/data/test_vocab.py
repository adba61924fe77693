"""Tests for the bundled corpus, the bundled SentencePiece model and `get_vocabulary`."""

import pathlib

import gin
import pytest
import sentencepiece as spm

from t5x_lite.data import vocab as vocab_lib

BUNDLED_DIR = pathlib.Path(vocab_lib.BUNDLED_SPM_PATH).parent
SPLITS = ("train", "validation")
NUM_PIECES = 8000


@pytest.fixture(scope="module")
def sp_model() -> spm.SentencePieceProcessor:
    """The bundled SentencePiece model, without extra ids."""
    return spm.SentencePieceProcessor(model_file=vocab_lib.BUNDLED_SPM_PATH)


@pytest.fixture(scope="module")
def vocabulary():
    """The default vocabulary: the bundled model plus 100 extra ids."""
    return vocab_lib.get_vocabulary()


@pytest.fixture(scope="module")
def validation_lines() -> list[str]:
    """The lines of the bundled validation split."""
    return (BUNDLED_DIR / "validation.txt").read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("split", SPLITS)
def test_corpus_split_is_nonempty_lines(split: str) -> None:
    data = (BUNDLED_DIR / f"{split}.txt").read_bytes()
    assert data and data.endswith(b"\n") and b"\r" not in data
    lines = data.decode("utf-8").split("\n")[:-1]
    assert lines and all(line.strip() for line in lines)


def test_corpus_is_large_enough() -> None:
    sizes = [(BUNDLED_DIR / f"{split}.txt").stat().st_size for split in SPLITS]
    assert sum(sizes) >= 2_000_000
    assert 0.01 < sizes[1] / sum(sizes) < 0.05


def test_special_ids_follow_t5(sp_model: spm.SentencePieceProcessor) -> None:
    assert (sp_model.pad_id(), sp_model.eos_id(), sp_model.unk_id(), sp_model.bos_id()) == (0, 1, 2, -1)
    assert sp_model.get_piece_size() == NUM_PIECES


def test_vocabulary_ids_and_size(vocabulary) -> None:
    assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
    assert vocabulary.vocab_size == NUM_PIECES + vocab_lib.DEFAULT_EXTRA_IDS


@pytest.mark.parametrize("index", [0, 1, 99])
def test_extra_ids_count_down_from_the_last_id(vocabulary, index: int) -> None:
    token_id = vocabulary.vocab_size - 1 - index
    assert vocabulary.encode(f"<extra_id_{index}>") == [token_id]
    assert vocabulary.decode([token_id]) == f"<extra_id_{index}>"


def test_round_trip_of_validation_sentences(vocabulary, validation_lines: list[str]) -> None:
    for line in validation_lines[:3] + validation_lines[-3:]:
        ids = vocabulary.encode(line)
        assert NUM_PIECES > max(ids) and min(ids) > vocabulary.unk_id
        assert vocabulary.decode(ids) == line


def test_unknown_rate_on_validation_is_tiny(sp_model: spm.SentencePieceProcessor, validation_lines: list[str]) -> None:
    ids = [i for line_ids in sp_model.encode(validation_lines) for i in line_ids]
    assert ids.count(sp_model.unk_id()) < 0.001 * len(ids)


def test_gin_binds_extra_ids() -> None:
    gin.parse_config("get_vocabulary.extra_ids = 10")
    try:
        assert vocab_lib.get_vocabulary().vocab_size == NUM_PIECES + 10
    finally:
        gin.clear_config()


def test_missing_model_raises_with_path(tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "no_such.model")
    with pytest.raises(FileNotFoundError, match="no_such.model") as error:
        vocab_lib.get_vocabulary(missing)
    assert missing in str(error.value) and "spm_path" in str(error.value)
