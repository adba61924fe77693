"""Trains the bundled SentencePiece vocabulary on the bundled corpus's train split.

The model follows T5's conventions: a unigram model with pad=0, eos=1, unk=2 and no BOS piece;
`t5x_lite.data.vocab.get_vocabulary` adds the 100 `<extra_id_*>` sentinels on top of it.
Every input line is used (no sampling) and the random generator is seeded, so a rerun with the
same flags and sentencepiece version writes a byte-identical model.

Reproduce the bundled `spiece.model` / `spiece.vocab` (from the repository root; the flags shown
are the defaults, ~3.5 s on one CPU core with sentencepiece 0.2.3):

    python tools/train_vocab.py --vocab_size=8000 --character_coverage=1.0 --seed=0 --num_threads=1
"""

import argparse
import io
import pathlib
import time

import sentencepiece as spm

BUNDLED_DIR = pathlib.Path(__file__).resolve().parent.parent / "t5x_lite" / "data" / "bundled"


def parse_args() -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--input", type=pathlib.Path, default=BUNDLED_DIR / "train.txt",
                        help="text file with one sentence or passage per line")
    parser.add_argument("--model_prefix", type=pathlib.Path, default=BUNDLED_DIR / "spiece",
                        help="writes <model_prefix>.model and <model_prefix>.vocab")
    parser.add_argument("--vocab_size", type=int, default=8000, help="number of pieces, pad/eos/unk included")
    parser.add_argument("--character_coverage", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of sentencepiece's random generator")
    parser.add_argument("--num_threads", type=int, default=1,
                        help="training threads; the scores (so the model bytes) depend on this number")
    return parser.parse_args()


def train(lines: list[str], vocab_size: int, character_coverage: float, seed: int, num_threads: int) -> bytes:
    """Trains a unigram SentencePiece model with T5's special-token ids; returns its proto bytes.

    The text is passed in memory, so the model records no file paths.
    """
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        normalization_rule_name="nmt_nfkc",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        input_sentence_size=0,
        num_threads=num_threads,
        minloglevel=1,
    )
    return model.getvalue()


def read_lines(path: pathlib.Path) -> list[str]:
    """Reads the non-empty lines of a UTF-8 text file."""
    if not path.is_file():
        raise FileNotFoundError(f"training text {path} not found; build it with tools/build_corpus.py")
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line]


def write_model(model: bytes, model_prefix: pathlib.Path) -> None:
    """Writes `<prefix>.model` and a `<prefix>.vocab` listing "piece<TAB>score" per id."""
    pathlib.Path(f"{model_prefix}.model").write_bytes(model)
    processor = spm.SentencePieceProcessor(model_proto=model)
    rows = (f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n" for i in range(processor.get_piece_size()))
    pathlib.Path(f"{model_prefix}.vocab").write_text("".join(rows), encoding="utf-8", newline="\n")


def main() -> None:
    """Trains the vocabulary and reports where it went and how long it took."""
    args = parse_args()
    start = time.perf_counter()
    model = train(read_lines(args.input), args.vocab_size, args.character_coverage, args.seed, args.num_threads)
    write_model(model, args.model_prefix)
    print(f"wrote {args.model_prefix}.model and .vocab in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
