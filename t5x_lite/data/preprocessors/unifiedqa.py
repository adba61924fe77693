"""UnifiedQA text-to-text formats: Python helpers and the equivalent seqio preprocessors.

UnifiedQA (Khashabi et al., 2020) casts every QA format as text -> text:

| format | inputs | targets |
| --- | --- | --- |
| extractive | `question \\n context` | the answer span |
| abstractive | `question \\n context` | the free-form answer |
| multiple choice | `question \\n (a) opt (b) opt ... \\n context` (context optional) | the correct option's text |
| yes/no | `question \\n context` | `yes` or `no` |

Conventions (the same in the Python helpers and the TF preprocessors, so both give identical strings):

* **Separator**: the four characters space, backslash, `n`, space (`SEPARATOR = " \\\\n "` in Python
  source), exactly as in UnifiedQA's released data files and its model card. It is *not* a newline
  character: SentencePiece vocabularies normalise newlines to spaces, so a real newline would vanish.
  Note that the bundled 8k vocabulary has no backslash (the corpus never uses one): the backslash
  becomes `<unk>` (id 2) followed by the piece `n`, a fixed two-token separator that the model learns
  like any other; decoding shows it as ` ⁇ n`. A vocabulary with a backslash piece (T5's) decodes it
  back exactly.
* **Lower-casing**: inputs and targets are lower-cased (UnifiedQA lower-cases everything), option
  labels included: `(A) ... (B) ...` become `(a) ... (b) ...`. Pass `lowercase=False` to keep case.
* **Whitespace**: runs of whitespace (newlines, tabs) in each field collapse to one space, and fields
  are stripped.
* Options are labelled `(A)`, `(B)`, ... in order (at most 26) and joined with single spaces.
* Multiple choice targets are the text of the correct option (not its label); yes/no targets are
  `yes`/`no` (from a bool, or the strings yes/no/true/false).

Records (what the preprocessors read) have the fields `question` (string), `context` (string; may be
empty for multiple choice), `options` (1-D strings; multiple choice only, empty otherwise) and
`answers` (1-D strings: all reference answers; the first is the training target). The preprocessors
output `inputs`, `targets` and `answers` (the formatted references, kept for metrics that take the
best score over all references, e.g. SQuAD's).
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf

SEPARATOR = " \\n "
FORMATS = ("extractive", "abstractive", "multiple_choice", "yes_no")
OPTION_LABELS = string.ascii_uppercase

_WHITESPACE = re.compile(r"\s+")
_YES_NO_STRINGS = {"yes": True, "true": True, "no": False, "false": False}


# ------------------------------------------------------------------ Python formatting helpers


def normalize_text(text: str, lowercase: bool = True) -> str:
    """Collapses whitespace runs to single spaces, strips, and (by default) lower-cases."""
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower() if lowercase else text


def format_options(options: Sequence[str], lowercase: bool = True) -> str:
    """`(A) first (B) second ...` (lower-cased by default: `(a) first (b) second ...`)."""
    if len(options) < 2:
        raise ValueError(f"A multiple-choice question needs at least 2 options, got {list(options)!r}.")
    if len(options) > len(OPTION_LABELS):
        raise ValueError(f"At most {len(OPTION_LABELS)} options (labels A-Z) are supported, got {len(options)}.")
    text = " ".join(f"({label}) {_WHITESPACE.sub(' ', option).strip()}" for label, option in zip(OPTION_LABELS, options))
    return normalize_text(text, lowercase)


def format_extractive(question: str, context: str, lowercase: bool = True) -> str:
    """`question \\n context`: the input of an extractive, abstractive or yes/no question."""
    return normalize_text(question, lowercase) + SEPARATOR + normalize_text(context, lowercase)


format_abstractive = format_yes_no = format_extractive  # the same input layout


def format_multiple_choice(
    question: str, options: Sequence[str], context: str | None = None, lowercase: bool = True
) -> str:
    """`question \\n (a) opt (b) opt ... \\n context`, or without context `question \\n (a) opt ...`."""
    text = normalize_text(question, lowercase) + SEPARATOR + format_options(options, lowercase)
    if context is not None and context.strip():
        text += SEPARATOR + normalize_text(context, lowercase)
    return text


def yes_no_answer(label: bool | str) -> str:
    """`yes`/`no` from a bool (or from the strings yes/no/true/false, any case)."""
    value = _YES_NO_STRINGS.get(label.strip().lower()) if isinstance(label, str) else label
    if value is True:
        return "yes"
    if value is False:
        return "no"
    raise ValueError(f"A yes/no answer must be a bool or one of yes/no/true/false, got {label!r}.")


def format_answer(answer: str, lowercase: bool = True) -> str:
    """A target string: whitespace collapsed, stripped, lower-cased by default."""
    return normalize_text(answer, lowercase)


def format_example(record: Mapping[str, Any], format: str, lowercase: bool = True) -> dict[str, str]:
    """The `{"inputs", "targets"}` strings of one record (same result as the seqio preprocessors).

    `record` has `question`, `context`, `options` (multiple choice) and `answers` (list; the first
    is the target) or `answer`. A yes/no answer may be a bool.
    """
    check_format(format)
    answers = record["answers"] if "answers" in record else [record["answer"]]
    if isinstance(answers, (str, bool)):
        answers = [answers]
    target = answers[0]
    context = record.get("context")
    if format == "multiple_choice":
        inputs = format_multiple_choice(record["question"], record["options"], context, lowercase)
    else:
        inputs = format_extractive(record["question"], context, lowercase)
    target = yes_no_answer(target) if format == "yes_no" else format_answer(target, lowercase)
    return {"inputs": inputs, "targets": target}


def check_format(format: str) -> None:
    """Raises a ValueError naming the formats for anything but one of `FORMATS`."""
    if format not in FORMATS:
        raise ValueError(f"Unknown UnifiedQA format {format!r}; pick one of {FORMATS}.")


# ------------------------------------------------------------------ seqio preprocessors (TF ops)


def _tf_normalize(text: tf.Tensor, lowercase: bool) -> tf.Tensor:
    text = tf.strings.strip(tf.strings.regex_replace(text, r"\s+", " "))
    return tf.strings.lower(text, encoding="utf-8") if lowercase else text


def _tf_options(options: tf.Tensor, lowercase: bool) -> tf.Tensor:
    labels = tf.constant([f"({label}) " for label in OPTION_LABELS])
    n = tf.shape(options)[0]
    tf.debugging.assert_greater_equal(n, 2, message="a multiple-choice record needs at least 2 options")
    labelled = tf.strings.join([labels[:n], tf.strings.strip(tf.strings.regex_replace(options, r"\s+", " "))])
    return _tf_normalize(tf.strings.reduce_join(labelled, separator=" "), lowercase)


def _tf_inputs(ex: Mapping[str, tf.Tensor], format: str, lowercase: bool) -> tf.Tensor:
    question = _tf_normalize(ex["question"], lowercase)
    context = _tf_normalize(ex["context"], lowercase)
    if format != "multiple_choice":
        return tf.strings.join([question, context], separator=SEPARATOR)
    head = tf.strings.join([question, _tf_options(ex["options"], lowercase)], separator=SEPARATOR)
    return tf.cond(
        tf.strings.length(context) > 0,
        lambda: tf.strings.join([head, context], separator=SEPARATOR),
        lambda: head,
    )


def _tf_answers(answers: tf.Tensor, format: str, lowercase: bool) -> tf.Tensor:
    answers = _tf_normalize(answers, lowercase)
    if format == "yes_no":
        # "true"/"false" become "yes"/"no"; records should already hold yes/no.
        answers = tf.strings.lower(answers)
        answers = tf.where(answers == "true", "yes", tf.where(answers == "false", "no", answers))
    return answers


def to_text_to_text(dataset: tf.data.Dataset, format: str, lowercase: bool = True) -> tf.data.Dataset:
    """Maps records (question, context, options, answers) to UnifiedQA `inputs`/`targets`.

    Keeps `answers` (every reference, formatted like the target) for max-over-references metrics.
    The target is the first answer.
    """
    check_format(format)

    @seqio.map_over_dataset
    def fn(ex):
        answers = _tf_answers(ex["answers"], format, lowercase)
        return {"inputs": _tf_inputs(ex, format, lowercase), "targets": answers[0], "answers": answers}

    return fn(dataset)


# format -> `to_text_to_text` for that format (the module docstring's table says what each makes).
PREPROCESSORS = {format: functools.partial(to_text_to_text, format=format) for format in FORMATS}
extractive_preprocessor, abstractive_preprocessor, multiple_choice_preprocessor, yes_no_preprocessor = (
    PREPROCESSORS.values()
)


def multiple_choice_rank_classification(dataset: tf.data.Dataset, lowercase: bool = True) -> tf.data.Dataset:
    """One example per (record, option) for scoring each option with the model (rank classification).

    Each output has `inputs` (the record's multiple-choice input), `targets` (that option's text),
    `idx` (the record's position in the dataset), `option_index` and `is_correct` (the option equals
    the first answer after formatting). Score every example (e.g. the log-likelihood of `targets`),
    then pick per `idx` with `metrics.qa.rank_classification`.
    """

    def expand(idx, ex):
        options = _tf_normalize(ex["options"], lowercase)
        answer = _tf_normalize(ex["answers"][0], lowercase)
        return _option_rows(idx, _tf_inputs(ex, "multiple_choice", lowercase), options, answer)

    return dataset.enumerate().flat_map(expand)


def yes_no_rank_classification(dataset: tf.data.Dataset, lowercase: bool = True) -> tf.data.Dataset:
    """Yes/no questions as rank classification over the two options `yes` and `no`: two rows per record,
    shaped as `multiple_choice_rank_classification`'s (so a model that never learnt to write yes/no still
    has a score: the likelier of the two answers)."""

    def expand(idx, ex):
        answer = _tf_answers(ex["answers"], "yes_no", lowercase)[0]
        return _option_rows(idx, _tf_inputs(ex, "yes_no", lowercase), tf.constant(["yes", "no"]), answer)

    return dataset.enumerate().flat_map(expand)


def _option_rows(idx: tf.Tensor, inputs: tf.Tensor, options: tf.Tensor, answer: tf.Tensor) -> tf.data.Dataset:
    """One row per option of record `idx`: its inputs, the option as targets, and whether it is the answer."""
    n = tf.shape(options)[0]
    return tf.data.Dataset.from_tensor_slices({
        "inputs": tf.fill([n], inputs),
        "targets": options,
        "idx": tf.fill([n], tf.cast(idx, tf.int32)),
        "option_index": tf.range(n, dtype=tf.int32),
        "is_correct": tf.equal(options, answer),
    })


# ------------------------------------------------------------------ TFDS record adapters


def squad_to_records(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """TFDS SQuAD v1.1 (`question`, `context`, `answers/text`) -> records with all references."""

    def fn(x):
        return {"question": x["question"], "context": x["context"], "options": tf.constant([], tf.string),
                "answers": x["answers"]["text"]}

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def boolq_to_records(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """TFDS SuperGLUE BoolQ (`question`, `passage`, `label`) -> yes/no records.

    BoolQ's questions carry no question mark; one is added, as in UnifiedQA's BoolQ inputs.
    """

    def fn(x):
        question = tf.strings.strip(x["question"])
        question = tf.cond(tf.strings.regex_full_match(question, r".*\?"), lambda: question,
                           lambda: tf.strings.join([question, "?"]))
        answer = tf.where(tf.equal(x["label"], 1), "yes", "no")
        return {"question": question, "context": x["passage"], "options": tf.constant([], tf.string),
                "answers": tf.reshape(answer, [1])}

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
