"""Builds the bundled UnifiedQA-style QA sets from the bundled Shakespeare corpus (offline).

Questions are derived automatically and deterministically from the plays in
`t5x_lite/data/bundled/{train,validation}.txt` (train: 22 plays; validation: The Tempest, so
validation questions come from text that training never shows):

* the plays are split into scenes and speeches (`SPEAKER. text`, speaker names in capitals);
* each example's context is a short run of consecutive speeches of one scene (at most
  `MAX_CONTEXT_WORDS` words; a speech longer than `MAX_SPEECH_WORDS` is cut at a sentence end and
  marked `...`), written as in the corpus: `HELENA. I will tell truth ... BERTRAM. ...`;
* four formats ask about those speeches (see the README beside the output):
  extractive `Who says "<quote>"?` -> the speaker's name, a span of the context;
  multiple choice `What does <SPEAKER> say next?` -> the next line among 4 options;
  yes/no `Does <SPEAKER> speak in this passage?` / `Does <SPEAKER> say "<quote>"?` -> yes/no, balanced;
  abstractive `What does <SPEAKER> say next?` -> the next line, free-form.

Output: `<format>_{train,validation}.jsonl` (fields `question`, `context`, `options` for multiple
choice, `answers`), one JSON object per line, keys sorted, ASCII, `\\n` line endings. Reruns
write byte-identical files. With `--check_tokens` (default on) every formatted input must fit in
`MAX_INPUT_TOKENS` SentencePiece tokens of the bundled vocabulary (EOS included).

Reproduce the bundled files (from the repository root):

    python tools/build_qa.py

(defaults: `--corpus_dir t5x_lite/data/bundled --output_dir t5x_lite/data/bundled/qa --seed 0`).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import pathlib
import random
import re
import statistics
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CORPUS_DIR = ROOT / "t5x_lite" / "data" / "bundled"
DEFAULT_OUTPUT_DIR = DEFAULT_CORPUS_DIR / "qa"

# Examples per format and split. Different sizes per format make examples-proportional mixing visible.
COUNTS = {
    "extractive": {"train": 1000, "validation": 150},
    "multiple_choice": {"train": 800, "validation": 150},
    "yes_no": {"train": 1200, "validation": 150},
    "abstractive": {"train": 600, "validation": 150},
}
MAX_CONTEXT_WORDS = 100  # ~150-250 tokens of the bundled vocabulary
MAX_SPEECH_WORDS = 60  # longer speeches are cut (at a sentence end when possible) and marked "..."
MAX_CONTEXT_SPEECHES = 8
MIN_CONTEXT_SPEECHES = 2
QUOTE_WORDS = (4, 12)  # a quoted clause: 4 to 12 words
LINE_WORDS = (3, 25)  # an answer "line": the first sentence or clause of a speech, 3 to 25 words
MIN_SPEAKER_SPEECHES = 3  # speakers asked about must speak at least this often in the play
MAX_INPUT_TOKENS = 512

# Plays whose speeches are labelled `NAME.` in capitals (Hamlet, King Lear, A Midsummer Night's
# Dream and Romeo and Juliet use other conventions and are left out; so are the poems and Milton).
TRAIN_PLAYS = (
    "ALL'S WELL THAT ENDS WELL", "ANTONY AND CLEOPATRA", "AS YOU LIKE IT", "THE COMEDY OF ERRORS",
    "THE TRAGEDY OF CORIOLANUS", "CYMBELINE", "JULIUS CAESAR", "LOVE'S LABOUR'S LOST", "MACBETH",
    "MEASURE FOR MEASURE", "THE MERCHANT OF VENICE", "THE MERRY WIVES OF WINDSOR",
    "MUCH ADO ABOUT NOTHING", "OTHELLO, THE MOOR OF VENICE", "PERICLES PRINCE OF TYRE",
    "THE TAMING OF THE SHREW", "THE LIFE OF TIMON OF ATHENS", "THE TRAGEDY OF TITUS ANDRONICUS",
    "THE HISTORY OF TROILUS AND CRESSIDA", "TWELFTH NIGHT; OR, WHAT YOU WILL",
    "THE TWO GENTLEMEN OF VERONA", "THE WINTER'S TALE",
)
VALIDATION_PLAYS = ("THE TEMPEST",)

_TITLE_LINE = re.compile(r"^(?P<title>[A-Z][A-Z',;. ]+?) by William Shakespeare\b")
_WORK_AFTER_LAST_PLAY = "PARADISE REGAINED"  # Milton follows the last Shakespeare work in train.txt
_ACT = r"(?:ACT|Act)\s+(?:[IVX]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b\.?"
_SCENE_HEADING = re.compile(rf"\b(?:{_ACT}\s*)?(?:SCENE|Scene)\s+(?:[IVX]+|\d+)\b\.?|\b{_ACT}")
_LABEL = re.compile(r"(?:(?<=\s)|^)(?P<name>(?:MRS?\. )?[A-Z][A-Z'\-]+(?: [A-Z][A-Z'\-]+)*)\.(?=\s)")
_NOT_SPEAKERS = re.compile(r"^(?:ACT|SCENE|PERSONS|DRAMATIS|SONG|DUMB|EPILOGUE|PROLOGUE|[IVXLC]+)\b")
# Not asked about: groups of speakers ("ALL", "BOTH CITIZENS", "LORDS", "PHRYNIA AND TIMANDRA").
_GROUPS = re.compile(
    r"\b(?:ALL|BOTH|SOME|SEVERAL|OTHERS|AND|LORDS|SOLDIERS|CITIZENS|SENATORS|SERVANTS|GENTLEMEN|LADIES|"
    r"GOTHS|ROMANS|TRIBUNES|PATRICIANS|PLEBEIANS|CONSPIRATORS|AEDILES|KNIGHTS|PLAYERS|MARINERS|BANDITTI|"
    r"MURDERERS|BROTHERS|WITCHES|OUTLAWS|SPIRITS|NYMPHS|REAPERS)\b"
)
_DIRECTION = re.compile(r"\[[^\]]*\]?")
_SENTENCE_END = re.compile(r"[.!?;:]$")
_CLAUSE_END = re.compile(r"[.!?;:,]$|--$")


@dataclasses.dataclass(frozen=True)
class Speech:
    """One speech: `speaker` as labelled (`HELENA`), `text` as in the corpus (directions kept)."""

    play: str
    scene: int
    index: int  # position within the scene
    speaker: str
    text: str

    @property
    def spoken(self) -> str:
        """The words spoken: stage directions removed, whitespace collapsed."""
        return " ".join(_DIRECTION.sub(" ", self.text).split())


# ------------------------------------------------------------------ parsing the plays


def read_plays(path: pathlib.Path, titles: Sequence[str]) -> dict[str, str]:
    """Returns {title: the play's text (its corpus lines joined by spaces)} for the named plays."""
    plays: dict[str, list[str]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _TITLE_LINE.match(line)
        if match:
            current = match.group("title")
            plays[current] = []
        elif line.startswith(_WORK_AFTER_LAST_PLAY):
            current = None
        if current is not None:
            plays[current].append(line)
    missing = [t for t in titles if t not in plays]
    if missing:
        raise ValueError(f"{path}: plays {missing} not found (titles present: {sorted(plays)}).")
    return {t: " ".join(plays[t]) for t in titles}


def parse_scenes(title: str, text: str) -> list[list[Speech]]:
    """Splits a play into scenes (from its first act/scene heading on) and scenes into speeches.

    A speech runs from its speaker label to the next label or scene heading. Text before a
    scene's first label (the place, opening stage directions) is dropped.
    """
    headings = list(_SCENE_HEADING.finditer(text))
    if not headings:
        raise ValueError(f"{title}: no ACT/SCENE heading found.")
    bounds = [m.start() for m in headings] + [len(text)]
    scenes = []
    for s, (start, end) in enumerate(itertools.pairwise(bounds)):
        body = text[start:end]
        labels = [m for m in _LABEL.finditer(body) if not _NOT_SPEAKERS.match(m.group("name"))
                  and not _inside_brackets(body, m.start())]
        speeches = []
        for i, m in enumerate(labels):
            stop = labels[i + 1].start() if i + 1 < len(labels) else len(body)
            speech_text = " ".join(body[m.end():stop].split())
            if speech_text:
                speeches.append(Speech(title, s, len(speeches), m.group("name"), speech_text))
        if speeches:
            scenes.append(speeches)
    return scenes


def _inside_brackets(text: str, pos: int) -> bool:
    return text.rfind("[", 0, pos) > text.rfind("]", 0, pos)


# ------------------------------------------------------------------ text pieces


def first_clause(text: str, min_words: int, max_words: int, strip_punctuation: bool) -> str | None:
    """The opening of `text` up to its first sentence end (. ! ? ; :) after min_words words and
    within max_words; failing that, up to its last clause end (also , and --) within max_words;
    failing that, the whole text if it has min..max words; else None."""
    words = text.split()
    limit = min(max_words, len(words))
    for n in range(min_words, limit + 1):
        if _SENTENCE_END.search(words[n - 1]):
            return _finish(words[:n], strip_punctuation)
    for n in range(limit, min_words - 1, -1):
        if _CLAUSE_END.search(words[n - 1]):
            return _finish(words[:n], strip_punctuation)
    if min_words <= len(words) <= max_words:
        return _finish(words, strip_punctuation)
    return None


def _finish(words: list[str], strip_punctuation: bool) -> str | None:
    text = " ".join(words)
    if strip_punctuation:
        text = text.rstrip(".,;:!?-'\" ").lstrip("'\"- ")
    if not any(c.isalpha() for c in text) or '"' in text:
        return None
    return text


def cut_speech(text: str, max_words: int) -> str:
    """A speech cut to at most max_words words, at a sentence end when there is one, + ` ...`."""
    words = text.split()
    if len(words) <= max_words:
        return text
    for n in range(max_words, max_words // 2, -1):
        if _SENTENCE_END.search(words[n - 1]):
            return " ".join(words[:n]) + " ..."
    return " ".join(words[:max_words]) + " ..."


def render(speeches: Sequence[Speech]) -> str:
    return " ".join(f"{s.speaker}. {cut_speech(s.text, MAX_SPEECH_WORDS)}" for s in speeches)


def n_words(text: str) -> int:
    return len(text.split())


def contains_word(text: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text, flags=re.IGNORECASE) is not None


def count_occurrences(text: str, quote: str) -> int:
    return text.lower().count(quote.lower())


# ------------------------------------------------------------------ windows


def window_around(scene: list[Speech], target: int, rng: random.Random) -> list[Speech] | None:
    """Consecutive speeches containing scene[target], starting 0-3 speeches before it."""
    start = max(0, target - rng.randint(0, 3))
    window = []
    for speech in scene[start:start + MAX_CONTEXT_SPEECHES]:
        if n_words(render(window + [speech])) > MAX_CONTEXT_WORDS:
            break
        window.append(speech)
    if target - start >= len(window) or len(window) < MIN_CONTEXT_SPEECHES:
        return None
    return window


def window_before(scene: list[Speech], target: int) -> list[Speech] | None:
    """The speeches just before scene[target] (as many as fit), ending right before it."""
    window: list[Speech] = []
    for speech in reversed(scene[max(0, target - MAX_CONTEXT_SPEECHES):target]):
        if n_words(render([speech] + window)) > MAX_CONTEXT_WORDS:
            break
        window.insert(0, speech)
    return window if len(window) >= MIN_CONTEXT_SPEECHES else None


# ------------------------------------------------------------------ example makers


def speaker_counts(scenes: list[list[Speech]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for scene in scenes:
        for s in scene:
            counts[s.speaker] = counts.get(s.speaker, 0) + 1
    return counts


def askable(speaker: str, counts: dict[str, int]) -> bool:
    return counts.get(speaker, 0) >= MIN_SPEAKER_SPEECHES and not _GROUPS.search(speaker)


def quote_of(speech: Speech, context: str) -> str | None:
    """A 4-12 word clause opening the speech that occurs exactly once in the context."""
    quote = first_clause(speech.spoken, *QUOTE_WORDS, strip_punctuation=True)
    if quote is None or n_words(quote) < QUOTE_WORDS[0] or count_occurrences(context, quote) != 1:
        return None
    return quote


def make_extractive(scene, target, counts, rng) -> dict | None:
    speech = scene[target]
    window = window_around(scene, target, rng)
    if window is None or not askable(speech.speaker, counts) or len({s.speaker for s in window}) < 2:
        return None
    context = render(window)
    quote = quote_of(speech, context)
    if quote is None or speech.speaker not in context:
        return None
    return {"question": f'Who says "{quote}"?', "context": context, "answers": [speech.speaker]}


def next_line(speech: Speech) -> str | None:
    return first_clause(speech.spoken, *LINE_WORDS, strip_punctuation=False)


def make_next_line(scene, target, counts, rng, lines_of_play, with_options: bool) -> dict | None:
    speech = scene[target]
    answer = next_line(speech)
    window = window_before(scene, target)
    if window is None or answer is None or not askable(speech.speaker, counts):
        return None
    record = {"question": f"What does {speech.speaker} say next?", "context": render(window), "answers": [answer]}
    if with_options:
        distractors = []
        candidates = [line for line in lines_of_play if _key(line) != _key(answer)
                      and _key(line) not in _key(record["context"])]
        while len(distractors) < 3:
            line = rng.choice(candidates)
            if all(_key(line) != _key(d) for d in distractors):
                distractors.append(line)
        options = distractors + [answer]
        rng.shuffle(options)
        record["options"] = options
    return record


def _key(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def make_yes_no(scene, target, counts, rng, play_speakers, ask_speak: bool, want_yes: bool) -> dict | None:
    speech = scene[target]
    window = window_around(scene, target, rng)
    if window is None:
        return None
    context = render(window)
    speakers = sorted({s.speaker for s in window})
    if ask_speak:  # "Does X speak in this passage?" (a "no" names a speaker of the play absent here)
        if want_yes:
            subject = speech.speaker
        else:
            absent = [p for p in play_speakers if not contains_word(context, p)]
            if not absent:
                return None
            subject = rng.choice(absent)
        if not askable(subject, counts):
            return None
        question = f"Does {subject} speak in this passage?"
    else:  # "Does X say '<quote>'?" (a "no" names another speaker of the passage)
        quote = quote_of(speech, context)
        others = [p for p in speakers if p != speech.speaker and askable(p, counts)]
        if quote is None or not askable(speech.speaker, counts) or (not want_yes and not others):
            return None
        subject = speech.speaker if want_yes else rng.choice(others)
        question = f'Does {subject} say "{quote}"?'
    return {"question": question, "context": context, "answers": ["yes" if want_yes else "no"]}


# ------------------------------------------------------------------ building


def build_split(scenes_by_play: dict[str, list[list[Speech]]], counts: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Draws each format's examples from random speeches (each speech used at most once per format)."""
    speakers = {play: speaker_counts(scenes) for play, scenes in scenes_by_play.items()}
    lines = {play: sorted({line for scene in scenes for s in scene if (line := next_line(s))})
             for play, scenes in scenes_by_play.items()}
    targets = [(play, s, t) for play, scenes in scenes_by_play.items()
               for s, scene in enumerate(scenes) for t in range(len(scene))]
    out = {}
    for f_index, fmt in enumerate(COUNTS):
        rng = random.Random(seed * 1000 + f_index)
        order = targets[:]
        rng.shuffle(order)
        records = []
        for play, s, t in order:
            if len(records) == counts[fmt]:
                break
            scene, count = scenes_by_play[play][s], speakers[play]
            if fmt == "extractive":
                record = make_extractive(scene, t, count, rng)
            elif fmt == "yes_no":
                # Cycles (speak, yes), (speak, no), (say, yes), (say, no): balanced per question type.
                record = make_yes_no(scene, t, count, rng, sorted(count), ask_speak=len(records) % 4 < 2,
                                     want_yes=len(records) % 2 == 0)
            else:
                record = make_next_line(scene, t, count, rng, lines[play], with_options=fmt == "multiple_choice")
            if record is not None:
                records.append(record)
        if len(records) < counts[fmt]:
            raise ValueError(f"Only {len(records)} {fmt} examples could be made, {counts[fmt]} wanted.")
        out[fmt] = records
    return out


def check(records: dict[str, list[dict]]) -> None:
    """Invariants: extractive answers occur in the context; yes/no is balanced; MC answer is an option."""
    for r in records["extractive"]:
        assert r["answers"][0] in r["context"], r
    yes = sum(r["answers"] == ["yes"] for r in records["yes_no"])
    assert abs(yes - len(records["yes_no"]) / 2) <= 1, yes
    for r in records["multiple_choice"]:
        assert r["options"].count(r["answers"][0]) == 1 and len(r["options"]) == 4, r


def token_stats(records: dict[str, list[dict]], spm_path: pathlib.Path) -> dict[str, tuple[int, int, int, int]]:
    """{format: (median input tokens, max input tokens, median target tokens, max target tokens)}."""
    import sentencepiece

    from t5x_lite.data.preprocessors import unifiedqa  # the formatting the tasks use (imports seqio: a few seconds)

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    stats = {}
    for fmt, recs in records.items():
        formatted = [unifiedqa.format_example(r, fmt) for r in recs]
        inputs = [len(sp.encode(f["inputs"])) + 1 for f in formatted]
        targets = [len(sp.encode(f["targets"])) + 1 for f in formatted]
        if max(inputs) > MAX_INPUT_TOKENS:
            raise ValueError(f"{fmt}: an input has {max(inputs)} tokens > {MAX_INPUT_TOKENS}.")
        stats[fmt] = (int(statistics.median(inputs)), max(inputs), int(statistics.median(targets)), max(targets))
    return stats


def write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=True) + "\n" for r in records)
    path.write_text(text, encoding="utf-8", newline="\n")


def build_files(corpus_dir: pathlib.Path, output_dir: pathlib.Path, seed: int = 0,
                splits: Sequence[str] = ("train", "validation"), check_tokens: bool = True) -> None:
    """Writes `<format>_<split>.jsonl` for the given splits into output_dir and prints statistics."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for split in splits:
        titles = TRAIN_PLAYS if split == "train" else VALIDATION_PLAYS
        plays = read_plays(corpus_dir / f"{split}.txt", titles)
        scenes_by_play = {title: parse_scenes(title, text) for title, text in plays.items()}
        n_speeches = sum(len(scene) for scenes in scenes_by_play.values() for scene in scenes)
        print(f"{split}: {len(plays)} plays, {n_speeches} speeches")
        records = build_split(scenes_by_play, {fmt: c[split] for fmt, c in COUNTS.items()}, seed)
        check(records)
        stats = token_stats(records, corpus_dir / "spiece.model") if check_tokens else {}
        for fmt, recs in records.items():
            path = output_dir / f"{fmt}_{split}.jsonl"
            write_jsonl(path, recs)
            words = [n_words(r["context"]) for r in recs]
            line = f"  {path.name}: {len(recs)} examples, context words median {int(statistics.median(words))} max {max(words)}"
            if fmt in stats:
                line += " | tokens in median {} max {}, targets median {} max {}".format(*stats[fmt])
            if fmt == "yes_no":
                line += f" | yes {sum(r['answers'] == ['yes'] for r in recs)}"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--corpus_dir", type=pathlib.Path, default=DEFAULT_CORPUS_DIR)
    parser.add_argument("--output_dir", type=pathlib.Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check_tokens", action=argparse.BooleanOptionalAction, default=True,
                        help="check input lengths with the bundled SentencePiece model (needs sentencepiece)")
    args = parser.parse_args()
    build_files(args.corpus_dir, args.output_dir, args.seed, check_tokens=args.check_tokens)


if __name__ == "__main__":
    main()
