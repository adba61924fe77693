"""`python -m t5x_lite.infer --gin_file=runs/infer.gin ...`: one JSON line per example.

Each line holds `inputs`, `targets` (when known), `prediction` and `score` (the log-likelihood of
the targets), for a task or mixture split or for a file of inputs (plain text, one input per
line, or JSONL with an `inputs` and optional `targets` field).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import gin
import seqio
import tensorflow as tf

import t5x_lite  # noqa: F401  (registers the bundled tasks and gin configurables)
from t5x_lite import config, evaluation, partitioning
from t5x_lite.data import vocab
from t5x_lite.models.base import BaseModel


def read_input_file(path: str) -> list[dict[str, str]]:
    """Records `{"inputs": ..., "targets": ...}` from a .txt (one input per line) or .jsonl file."""
    file = Path(path)
    if not file.is_file():
        raise config.UserError(f"INFER_INPUT_FILE {path!r} does not exist.")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise config.UserError(f"INFER_INPUT_FILE {path!r} is empty; put one input per line.")
    if file.suffix != ".jsonl":
        return [{"inputs": line, "targets": ""} for line in lines]
    records = []
    for number, line in enumerate(lines, start=1):
        record = json.loads(line)
        if "inputs" not in record:
            raise config.UserError(f"{path}, line {number}: the record has no 'inputs' field.")
        records.append({"inputs": str(record["inputs"]), "targets": str(record.get("targets", ""))})
    return records


def file_task(records: Sequence[Mapping[str, str]]) -> seqio.Task:
    """An unregistered text-to-text task over in-memory records, with the (gin-configured) vocabulary."""
    vocabulary = vocab.get_vocabulary()
    features = {name: seqio.Feature(vocabulary, add_eos=True) for name in ("inputs", "targets")}
    source = seqio.FunctionDataSource(
        lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
            {k: [r[k] for r in records] for k in ("inputs", "targets")}
        ),
        splits=["infer"],
    )
    return seqio.Task(
        "infer_input_file", source, output_features=features,
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
    )


def task_examples(
    task: seqio.Task, split: str, lengths: Mapping[str, int], converter: seqio.FeatureConverter
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """The task's examples (with text) and the same examples, in order, as enumerated model features."""
    ds = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1)
    return ds, converter(ds, lengths).enumerate()


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
    """Writes predictions and scores to `output_file`; returns the number of lines written."""
    if (mixture_or_task_name is None) == (input_file is None):
        raise config.UserError("Set exactly one of MIXTURE_OR_TASK_NAME and INFER_INPUT_FILE.")
    if input_file is not None:
        tasks, split = [file_task(read_input_file(input_file))], "infer"
    else:
        provider = config.lookup_task(mixture_or_task_module, mixture_or_task_name, task_feature_lengths)
        tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    output = Path(output_file)
    config.prepare_output_dir(str(output.parent))
    mesh = partitioning.make_mesh()
    rules = partitioning.logical_axis_rules()
    graphdef, params = config.load_checkpoint_params(model, checkpoint_path, mesh, rules)
    runner = evaluation.ModelRunner(model, graphdef, mesh, rules, eos_id=evaluation.targets_eos_id(tasks[0]))
    converter = model.feature_converter_cls(pack=False)
    written = 0
    with open(output, "w", encoding="utf-8") as out:
        for task in tasks:
            raw, features = task_examples(task, split, task_feature_lengths, converter)
            predictions = dict(runner.predict(params, features, task_feature_lengths["targets"]))
            scores = dict(runner.score(params, features))
            vocabulary = task.output_features["targets"].vocabulary
            input_vocabulary = task.output_features["inputs"].vocabulary
            for index, example in enumerate(raw.as_numpy_iterator()):
                targets = example["targets"].tolist()
                line = {
                    "task": task.name,
                    "inputs": input_vocabulary.decode(example["inputs"].tolist()),
                    "targets": vocabulary.decode(targets),
                    "prediction": vocabulary.decode(predictions[index]),
                    "score": scores[index] if len(targets) > 1 else None,
                }
                out.write(json.dumps(line) + "\n")
                written += 1
    print(f"Wrote {written} predictions to {output}.")
    return written


if __name__ == "__main__":
    config.run_entry_point(infer, config.INFER_REQUIRED_MACROS)
