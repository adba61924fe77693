"""Builds the bundled classification and tagging sets from the bundled corpus (offline, deterministic).

Three small labelled sets for BERT-style fine-tuning, all derived from the public-domain text in
`t5x_lite/data/bundled/{train,validation}.txt`:

* `author_{split}.tsv` (`label<TAB>sentence`): who wrote the excerpt, `shakespeare` or `milton`.
  Excerpts are runs of whole sentences (or a sentence cut at a clause end) of 10-40 words, with
  speaker labels, headings (any all-capital word) and stage directions removed, so the cue is the
  language, not the layout. Milton: the last 20% of each of his three works (by line) is held out
  for validation; Shakespeare: validation comes from The Tempest (validation.txt), which training
  never sees. Balanced: as many Shakespeare as Milton excerpts per split.
* `next_{split}.tsv` (`label<TAB>sentence1<TAB>sentence2`): does excerpt 2 directly follow
  excerpt 1 in the text (`next`), or is it an excerpt from elsewhere (`random`: a different work,
  or the same work at least `MIN_RANDOM_DISTANCE` lines away)? Half of each; as BERT's
  next-sentence task, over the same excerpts (train: train.txt; validation: The Tempest).
* `speakers_{split}.tsv` (`tokens<TAB>tags`, both space-separated, one tag per token): runs of
  consecutive speeches written `SPEAKER. words ...` (stage directions removed), tagged BIO:
  `B-SPK`/`I-SPK` on a speech's label (e.g. `FIRST LORD.`), `B-PER` on a mention of one of the
  play's characters by name (a one-word speaker name, e.g. `Bertram,` for `BERTRAM`, that never
  occurs in lower case in the play, so `Clown` or `Lord` are not names), `O` elsewhere.
  Train: the 22 plays of tools/build_qa.py; validation: The Tempest (unseen names).

Reproduce the bundled files (from the repository root):

    python tools/build_classification.py

(defaults: `--corpus_dir t5x_lite/data/bundled --output_dir t5x_lite/data/bundled/cls --seed 0`).
Reruns write byte-identical files.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import pathlib
import random
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import build_qa  # the play parser shared with the QA sets

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CORPUS_DIR = ROOT / "t5x_lite" / "data" / "bundled"
DEFAULT_OUTPUT_DIR = DEFAULT_CORPUS_DIR / "cls"

EXCERPT_WORDS = (10, 40)
MILTON_HELD_OUT = 0.2  # the last fifth of each Milton work's lines is validation text
MIN_RANDOM_DISTANCE = 10  # lines between an excerpt and a same-work "random" partner
NEXT_COUNTS = {"train": 2000, "validation": 300}
TAGGING_COUNTS = {"train": 1500, "validation": 300}
TAGGING_WORDS = (15, 50)
TAGS = ("O", "B-SPK", "I-SPK", "B-PER")

_MILTON_STARTS = ("PARADISE REGAINED", "L'ALLEGRO, IL PENSEROSO", "AREOPAGITICA")
_SHAKESPEARE_TITLE = re.compile(r"^(?P<title>.+?) by William Shakespeare\b")
_DIRECTION = re.compile(r"\[[^\]]*\]?|\{[^}]*\}?")
_CAPITAL_WORD = re.compile(r"^[^A-Za-z]*[A-Z][A-Z'\-.,;:!?]*[A-Z][^a-z]*$")  # HELENA. ACT SCENE L'ALLEGRO
_SENTENCE_END = re.compile(r"[.!?]['\")]*$")
_CLAUSE_END = re.compile(r"[.!?;:,]['\")]*$|--$")


# ------------------------------------------------------------------ reading works


def read_works(path: pathlib.Path) -> dict[str, list[tuple[int, str]]]:
    """{work: [(line number, line), ...]}: each Shakespeare work by its title line, Milton's three."""
    works: dict[str, list[tuple[int, str]]] = {}
    current = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        match = _SHAKESPEARE_TITLE.match(line)
        milton = next((start for start in _MILTON_STARTS if line.startswith(start)), None)
        if match:
            current = f"shakespeare: {match.group('title')}"
            works[current] = []
            continue  # the title line holds the title and the list of persons
        if milton:
            current = f"milton: {milton}"
            works[current] = []
        if current is not None:
            works[current].append((number, line))
    return works


def clean(line: str) -> str:
    """Stage directions and all-capital words (speaker labels, headings, titles) removed."""
    words = [w for w in _DIRECTION.sub(" ", line).split() if not _CAPITAL_WORD.match(w) or w in ("I", "O", "A")]
    return " ".join(words)


def excerpts(text: str) -> list[str]:
    """Consecutive runs of whole sentences of 10-40 words; a longer sentence is cut at its last
    clause end within 40 words (or skipped if it has none)."""
    low, high = EXCERPT_WORDS
    out, current = [], []
    for word in text.split():
        current.append(word)
        if _SENTENCE_END.search(word) and len(current) >= low:
            out.append(" ".join(current))
            current = []
        elif len(current) >= high:
            cut = max((i for i in range(low, high + 1) if _CLAUSE_END.search(current[i - 1])), default=None)
            if cut is not None:
                out.append(" ".join(current[:cut]))
            current = current[cut:] if cut is not None else []
    return [e for e in out if sum(c.isalpha() for c in e) >= 20]


def work_excerpts(works: dict[str, list[tuple[int, str]]]) -> list[tuple[str, int, str]]:
    """(work, line number, excerpt) for every excerpt of every work, in text order."""
    return [(work, number, e) for work, lines in works.items() for number, line in lines for e in excerpts(clean(line))]


def milton_split(works: dict[str, list[tuple[int, str]]]) -> dict[str, set[int]]:
    """Line numbers of Milton's train and validation text (the last 20% of each work held out)."""
    split: dict[str, set[int]] = {"train": set(), "validation": set()}
    for work, lines in works.items():
        if work.startswith("milton"):
            cut = round(len(lines) * (1 - MILTON_HELD_OUT))
            split["train"].update(n for n, _ in lines[:cut])
            split["validation"].update(n for n, _ in lines[cut:])
    return split


# ------------------------------------------------------------------ the three sets


def build_author(train_works, validation_works, rng: random.Random) -> dict[str, list[tuple[str, ...]]]:
    held = milton_split(train_works)
    train_items = work_excerpts(train_works)
    milton = {s: [e for w, n, e in train_items if w.startswith("milton") and n in held[s]] for s in held}
    shakespeare = {
        "train": [e for w, _, e in train_items if w.startswith("shakespeare")],
        "validation": [e for _, _, e in work_excerpts(validation_works)],
    }
    records = {}
    for split in ("train", "validation"):
        chosen = rng.sample(shakespeare[split], len(milton[split]))
        rows = [("milton", e) for e in milton[split]] + [("shakespeare", e) for e in chosen]
        rng.shuffle(rows)
        records[split] = rows
    return records


def build_next(works, count: int, rng: random.Random) -> list[tuple[str, ...]]:
    items = work_excerpts(works)
    following = [(a, b) for a, b in itertools.pairwise(items) if a[0] == b[0] and b[1] - a[1] <= 1]
    rows = []
    for a, b in rng.sample(following, count // 2):
        rows.append(("next", a[2], b[2]))
    for a, _ in rng.sample(following, count - count // 2):
        while True:
            other = rng.choice(items)
            if other[0] != a[0] or abs(other[1] - a[1]) >= MIN_RANDOM_DISTANCE:
                break
        rows.append(("random", a[2], other[2]))
    rng.shuffle(rows)
    return rows


def play_names(scenes: list[list[build_qa.Speech]]) -> set[str]:
    """One-word speaker names (in capitals) that never occur as a lower-case word in the play."""
    lower_words = {w.strip(".,;:!?'\"()-").removesuffix("'s") for scene in scenes for s in scene for w in s.spoken.split()
                   if w[:1].islower()}
    labels = {part for scene in scenes for s in scene for part in s.speaker.split()}
    return {n for n in labels if n.isalpha() and len(n) >= 3 and n.lower() not in lower_words
            and not build_qa._GROUPS.search(n)}


def tag_speech(speech: build_qa.Speech, names: set[str]) -> list[tuple[str, str]]:
    label = speech.speaker.split()
    tokens = [(w + "." if i == len(label) - 1 else w, "B-SPK" if i == 0 else "I-SPK") for i, w in enumerate(label)]
    for word in speech.spoken.split():
        core = word.strip(".,;:!?'\"()-").removesuffix("'s").removesuffix("'")
        tokens.append((word, "B-PER" if core.upper() in names and core in (core.upper(), core.title()) else "O"))
    return tokens


def build_tagging(corpus_dir: pathlib.Path, split: str, count: int, rng: random.Random) -> list[tuple[str, ...]]:
    titles = build_qa.TRAIN_PLAYS if split == "train" else build_qa.VALIDATION_PLAYS
    plays = build_qa.read_plays(corpus_dir / f"{split}.txt", titles)
    windows = []
    for title, text in plays.items():
        scenes = build_qa.parse_scenes(title, text)
        names = play_names(scenes)
        for scene in scenes:
            tagged = [tag_speech(s, names) for s in scene]
            for start in range(len(scene)):
                window: list[tuple[str, str]] = []
                for speech in tagged[start:]:
                    if len(window) + len(speech) > TAGGING_WORDS[1]:
                        break
                    window += speech
                if len(window) >= TAGGING_WORDS[0]:
                    windows.append(window)
    rows = rng.sample(windows, count)
    return [(" ".join(w for w, _ in row), " ".join(t for _, t in row)) for row in rows]


def write_tsv(path: pathlib.Path, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    for row in rows:
        if any("\t" in cell or "\n" in cell for cell in row):
            raise ValueError(f"{path}: a cell holds a tab or newline: {row}")
    text = "".join("\t".join(r) + "\n" for r in [header, *rows])
    path.write_text(text, encoding="ascii", newline="\n")


def build_files(corpus_dir: pathlib.Path, output_dir: pathlib.Path, seed: int = 0) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    train_works = read_works(corpus_dir / "train.txt")
    validation_works = read_works(corpus_dir / "validation.txt")
    author = build_author(train_works, validation_works, random.Random(seed))
    for split, works in (("train", train_works), ("validation", validation_works)):
        write_tsv(output_dir / f"author_{split}.tsv", ("label", "sentence"), author[split])
        rows = build_next(works, NEXT_COUNTS[split], random.Random(seed + 1))
        write_tsv(output_dir / f"next_{split}.tsv", ("label", "sentence1", "sentence2"), rows)
        tagged = build_tagging(corpus_dir, split, TAGGING_COUNTS[split], random.Random(seed + 2))
        write_tsv(output_dir / f"speakers_{split}.tsv", ("tokens", "tags"), tagged)
        tag_counts = collections.Counter(t for _, tags in tagged for t in tags.split())
        print(f"{split}: author {len(author[split])} ({collections.Counter(r[0] for r in author[split])}), "
              f"next {len(rows)} ({collections.Counter(r[0] for r in rows)}), "
              f"speakers {len(tagged)} ({dict(sorted(tag_counts.items()))})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--corpus_dir", type=pathlib.Path, default=DEFAULT_CORPUS_DIR)
    parser.add_argument("--output_dir", type=pathlib.Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build_files(args.corpus_dir, args.output_dir, args.seed)


if __name__ == "__main__":
    main()
