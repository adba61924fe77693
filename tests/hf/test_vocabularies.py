"""Hugging Face tokenizers as seqio vocabularies: the same ids as `tokenizers` / `transformers`."""

import json
import shutil

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_lite import hf
from tests.hf.tokenizer_fixtures import BUNDLED, byte_level_bpe, wordpiece

SAMPLES = ["To be, or not to be: that is the question.", "Whether 'tis nobler in the mind", "x"]


@pytest.fixture(params=["wordpiece", "bpe"])
def tokenizers_vocabulary(request, tmp_path):
    if request.param == "wordpiece":
        return hf.TokenizersVocabulary(wordpiece(tmp_path / "tokenizer.json"), eos_token="[SEP]", unk_token="[UNK]",
                                       pad_token="[PAD]")
    return hf.TokenizersVocabulary(byte_level_bpe(tmp_path / "tokenizer.json"), eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def test_tokenizers_vocabulary_matches_the_tokenizer_eagerly_and_in_tf(tokenizers_vocabulary):
    vocab, tokenizer = tokenizers_vocabulary, tokenizers_vocabulary.tokenizer
    assert vocab.vocab_size == tokenizer.get_vocab_size() and vocab.pad_id == 0
    for text in SAMPLES:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert vocab.encode(text) == ids
        assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids
        assert vocab.decode([*ids, vocab.eos_id, 7, 8]) == tokenizer.decode(ids)  # stops at EOS
        assert vocab.decode_tf(tf.constant(ids)).numpy().decode() == tokenizer.decode(ids)
    batch = vocab.encode_tf(tf.constant(SAMPLES))
    assert batch.to_list() == [tokenizer.encode(t, add_special_tokens=False).ids for t in SAMPLES]
    padded = batch.to_tensor(default_value=vocab.pad_id)
    decoded = [t.decode() for t in vocab.decode_tf(padded).numpy()]
    assert decoded == [tokenizer.decode(tokenizer.encode(t, add_special_tokens=False).ids) for t in SAMPLES]
    # Inside a tf.data pipeline (graph mode) too.
    ds = tf.data.Dataset.from_tensor_slices(SAMPLES).map(vocab.encode_tf)
    assert [x.tolist() for x in ds.as_numpy_iterator()] == batch.to_list()


def test_tokenizers_vocabulary_round_trips_through_transformers(tokenizers_vocabulary, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf.save_vocabulary(tokenizers_vocabulary, tmp_path / "out")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in SAMPLES:
        assert auto(text, add_special_tokens=False).input_ids == tokenizers_vocabulary.encode(text)
    assert auto.eos_token_id == tokenizers_vocabulary.eos_id
    assert hf.load_vocabulary(str(tmp_path / "out")) == tokenizers_vocabulary


@pytest.fixture
def spiece_dir(tmp_path):
    folder = tmp_path / "t5_tokenizer"
    folder.mkdir()
    shutil.copy(BUNDLED / "spiece.model", folder / "spiece.model")
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_spiece_model_is_a_sentencepiece_vocabulary_with_the_extra_ids(spiece_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = hf.load_vocabulary(str(spiece_dir))
    assert isinstance(vocab, seqio.SentencePieceVocabulary) and vocab.extra_ids == 100
    auto = transformers.AutoTokenizer.from_pretrained(spiece_dir)
    assert vocab.vocab_size == len(auto) == 8100
    text = SAMPLES[0] + " <extra_id_0> and <extra_id_99>"
    assert list(vocab.encode(text)) == auto(text, add_special_tokens=False).input_ids
    # Export: transformers reads it back; so do we.
    hf.save_vocabulary(vocab, tmp_path / "out")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")(text).input_ids == auto(text).input_ids
    reloaded = hf.load_vocabulary(str(tmp_path / "out"))
    assert (reloaded.sp_model, reloaded.extra_ids) == (vocab.sp_model, vocab.extra_ids)
    # transformers 5 saves T5 tokenizers as tokenizer.json only: same ids through TokenizersVocabulary.
    auto.save_pretrained(tmp_path / "tokenizer_json_only")
    assert not (tmp_path / "tokenizer_json_only" / "spiece.model").exists()
    as_json = hf.load_vocabulary(str(tmp_path / "tokenizer_json_only"))
    assert isinstance(as_json, hf.TokenizersVocabulary)
    assert (as_json.vocab_size, as_json.eos_id, as_json.pad_id) == (8100, 1, 0)
    assert list(as_json.encode(text)) == list(vocab.encode(text))


def test_extra_ids_come_from_the_tokenizer_config(spiece_dir):
    config = json.loads((spiece_dir / "tokenizer_config.json").read_text())
    del config["extra_ids"]
    config["additional_special_tokens"] = ["<extra_id_0>", "<extra_id_1>", {"content": "<extra_id_2>"}]
    (spiece_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert hf.load_vocabulary(str(spiece_dir)).extra_ids == 3
    (spiece_dir / "tokenizer_config.json").unlink()
    assert hf.load_vocabulary(str(spiece_dir)).extra_ids == 100  # transformers' T5Tokenizer default


def test_vocabulary_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer: expected spiece.model"):
        hf.load_vocabulary(str(tmp_path))
    path = wordpiece(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=r"Special token '</s>' is not in the vocabulary"):
        hf.TokenizersVocabulary(path, eos_token="</s>")
    with pytest.raises(TypeError, match="Cannot write a ByteVocabulary"):
        hf.save_vocabulary(seqio.ByteVocabulary(), tmp_path / "out")


def test_sentinels_count_down_from_the_top_like_t5(spiece_dir):
    vocab = hf.load_vocabulary(str(spiece_dir))
    ids = np.asarray(vocab.encode("<extra_id_0> <extra_id_1>"))
    assert ids[ids >= 8000].tolist() == [vocab.vocab_size - 1, vocab.vocab_size - 2]
