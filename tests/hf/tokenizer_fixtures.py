"""Tiny tokenizers trained in the test with the `tokenizers` package (no download)."""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

BUNDLED = Path(__file__).resolve().parents[2] / "t5x_lite" / "data" / "bundled"
TEXT = (BUNDLED / "validation.txt").read_text(encoding="utf-8").splitlines()[:300]


def wordpiece(path: Path) -> Path:
    """A BERT-style WordPiece tokenizer.json ([PAD]=0, [UNK], [CLS], [SEP], [MASK])."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(TEXT, trainers.WordPieceTrainer(vocab_size=300, special_tokens=special))
    tokenizer.save(str(path))
    return path


def byte_level_bpe(path: Path) -> Path:
    """A GPT-2-style byte-level BPE tokenizer.json with <pad>=0, </s>=1, <unk>=2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TEXT, trainer)
    tokenizer.save(str(path))
    return path


def _byte_level_bpe(special_tokens: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TEXT, trainer)
    return tokenizer


def gpt2_style_bpe(path: Path) -> Path:
    """A GPT-2-style byte-level BPE: no pad token, so id 0 is the ordinary "!"; `<|endoftext|>` is the last id."""
    tokenizer = _byte_level_bpe([])
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(path))
    return path


def bart_style_bpe(path: Path) -> Path:
    """A BART-style byte-level BPE: <s>=0, <pad>=1, </s>=2, <unk>=3, ..., `<mask>` the last id."""
    tokenizer = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer.add_special_tokens(["<mask>"])
    tokenizer.save(str(path))
    return path


def save_hf_tokenizer(tokenizer_json: Path, folder: Path, **special_tokens: str):
    """Writes the tokenizer into `folder` as `transformers` does (tokenizer.json + tokenizer_config.json)
    and returns the `transformers` tokenizer read back from there."""
    import transformers

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tokenizer_json)),
                                                **special_tokens)
    fast.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def seqio_packed_examples(vocabulary, pairs: list[tuple[str, str]], lengths: dict[str, int]) -> list[dict]:
    """(inputs, targets) text pairs through a seqio task's steps with `vocabulary` (tokenize, append EOS)
    and seqio's packing EncDec feature converter."""
    import seqio
    import tensorflow as tf

    features = {name: seqio.Feature(vocabulary, add_eos=True) for name in ("inputs", "targets")}
    ds = tf.data.Dataset.from_tensor_slices({"inputs": [p[0] for p in pairs], "targets": [p[1] for p in pairs]})
    ds = seqio.preprocessors.tokenize(ds, features)
    ds = seqio.preprocessors.append_eos_after_trim(ds, sequence_length=lengths, output_features=features)
    return list(seqio.EncDecFeatureConverter(pack=True)(ds, lengths).as_numpy_iterator())
