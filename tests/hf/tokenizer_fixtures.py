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
