"""`python -m t5x_lite.infer --gin_file=runs/infer.gin ...`: one JSON line per example.

Each line holds `inputs`, `targets` (when known), `prediction` and `score` (the log-likelihood of
the targets), for a task or mixture split or (text-to-text models) for a file of inputs: plain
text, one input per line, or JSONL with an `inputs` and optional `targets` field. Classification
tasks write label names (`"prediction": "milton"`), tagging tasks one tag name per word.
"""

from __future__ import annotations

from t5x_lite import cli

if __name__ == "__main__":
    cli.exit_on_help(cli.INFER_REQUIRED_MACROS)  # before the imports below load TensorFlow: --help answers at once
cli.keep_tensorflow_off_gpus()  # first: the imports below load TensorFlow (its C++ start-up logs held back)

import json
from collections.abc import Iterator, Mapping, Sequence

import gin
import jax
import numpy as np
import seqio

import t5x_lite.configurables  # noqa: F401  (declares the gin configurables the gin files name)
from t5x_lite import checkpoints, evaluation, partitioning, storage
from t5x_lite.data import registration, special_tokens, vocab
from t5x_lite.data.vocab import LabelVocabulary
from t5x_lite.models.base import BaseModel


def read_input_file(path: str) -> list[dict[str, str]]:
    """Records `{"inputs": ..., "targets": ...}` from a .txt (one input per line) or .jsonl file."""
    lines = cli.read_lines(path, "INFER_INPUT_FILE", "input")
    if storage.path(path).suffix != ".jsonl":
        return [{"inputs": line, "targets": ""} for line in lines]
    records = []
    for number, line in enumerate(lines, start=1):
        record = json.loads(line)
        if "inputs" not in record:
            raise cli.UserError(f"{path}, line {number}: the record has no 'inputs' field.")
        records.append({"inputs": str(record["inputs"]), "targets": str(record.get("targets", ""))})
    return records


def file_task(records: Sequence[Mapping[str, str]]) -> seqio.Task:
    """An unregistered text-to-text task over in-memory records, with the (gin-configured) vocabulary."""
    return registration.records_task(records, vocab.get_vocabulary(), "infer_input_file")


def readable(vocabulary: seqio.Vocabulary, ids: list[int], gold: list[int]) -> str | list[str]:
    """Text for a row of target or predicted ids: decoded text, a label's name, or (tagging: one tag per
    position) the tag names at the positions the gold tags label, i.e. one per word."""
    if not isinstance(vocabulary, LabelVocabulary):
        return vocabulary.decode(ids)
    if vocabulary.first_id == 0:
        return vocabulary.label_name(ids[0])
    return [vocabulary.label_name(ids[i]) for i, tag in enumerate(gold) if tag > 0]


def readable_bert_inputs(vocabulary: seqio.Vocabulary, ids: list[int]) -> str:
    """`[CLS] A [SEP] (B [SEP])` word pieces -> "A" or "A [SEP] B" (the specials are extra ids that
    would otherwise print as sentinels)."""
    special = special_tokens.bert_special_ids(vocabulary)
    segments, current = [], []
    for token in ids:
        if token == special.sep:
            segments.append(current)
            current = []
        elif token not in (special.cls, vocabulary.pad_id):
            current.append(token)
    return " [SEP] ".join(vocabulary.decode(segment) for segment in [*segments, current] if segment)


def example_record(task: seqio.Task, example: Mapping[str, np.ndarray], prediction: list[int], score: float) -> dict:
    """One output line: the example's text, the prediction made readable, and the targets' score."""
    vocabulary = task.output_features["targets"].vocabulary
    input_vocabulary = task.output_features["inputs"].vocabulary
    targets, inputs = example["targets"].tolist(), example["inputs"].tolist()
    labelled = isinstance(vocabulary, LabelVocabulary)  # BERT classification or tagging
    return {
        "task": task.name,
        "inputs": readable_bert_inputs(input_vocabulary, inputs) if labelled else input_vocabulary.decode(inputs),
        "targets": readable(vocabulary, targets, targets),
        "prediction": readable(vocabulary, prediction, targets),
        # A text target of one id is EOS alone (an input file without targets): nothing to score.
        "score": score if labelled or len(targets) > 1 else None,
    }


@gin.configurable
def infer(
    *,
    model: BaseModel = gin.REQUIRED,
    checkpoint_path: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    output_file: str = gin.REQUIRED,
    mixture_or_task_name: str | None = None,
    input_file: str | None = None,
    split: str = "validation",
    mixture_or_task_module: str | None = None,
) -> int:
    """Writes predictions and scores to `output_file` (process 0; every process decodes its share of the examples);
    returns the number of lines."""
    cli.keep_tensorflow_off_gpus()
    if (mixture_or_task_name is None) == (input_file is None):
        raise cli.UserError("Set exactly one of MIXTURE_OR_TASK_NAME and INFER_INPUT_FILE.")
    if input_file is not None:
        if not model.text_to_text:
            raise cli.UserError(
                f"INFER_INPUT_FILE holds text-to-text inputs, but {type(model).__name__} predicts for a task's "
                "examples (labels, tags or masked pieces): register the file as a task (e.g. "
                "register_classification_task / register_tagging_task) and set MIXTURE_OR_TASK_NAME instead."
            )
        tasks, split = [file_task(read_input_file(input_file))], "infer"
    else:
        provider = cli.load_task(mixture_or_task_name, mixture_or_task_module, task_feature_lengths)
        tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    output = storage.path(output_file)  # a local path or gs://
    cli.prepare_output_dir(str(output.parent))
    mesh = partitioning.make_mesh()
    rules = partitioning.logical_axis_rules()
    graphdef, params = checkpoints.load_checkpoint_params(model, checkpoint_path, mesh, rules)
    runner = evaluation.ModelRunner(model, graphdef, mesh, rules, eos_id=evaluation.targets_eos_id(tasks[0]))
    # Every process decodes its share of each batch and builds every line; process 0 writes them.
    lines = (line for task in tasks for line in task_lines(task, runner, params, model, task_feature_lengths, split))
    if jax.process_index() != 0:
        return sum(1 for _ in lines)
    written = 0
    with output.open("w", encoding="utf-8") as out:
        for line in lines:
            out.write(line)
            written += 1
    print(f"Wrote {written} predictions to {output}.")
    return written


def task_lines(
    task: seqio.Task, runner: evaluation.ModelRunner, params: dict, model: BaseModel,
    task_feature_lengths: Mapping[str, int], split: str,
) -> Iterator[str]:
    """The output lines of a task's split, in order: its examples decoded and scored (each process decoding its
    share; every process gets them all), then made readable."""
    raw = task.get_dataset(task_feature_lengths, split=split, shuffle=False, num_epochs=1)  # with the text
    features = model.feature_converter_cls(pack=False)(raw, task_feature_lengths).enumerate()  # the same examples
    predictions = dict(runner.predict(params, features, task_feature_lengths["targets"]))
    scores = dict(runner.score(params, features))
    for index, example in enumerate(raw.as_numpy_iterator()):
        try:
            line = example_record(task, example, predictions[index], scores[index])
        except ValueError as error:
            raise cli.UserError(f"Task {task.name!r}, example {index}: {error}") from None
        yield json.dumps(line) + "\n"


if __name__ == "__main__":
    cli.run_entry_point(infer, cli.INFER_REQUIRED_MACROS)
