"""Prints a few examples of a registered seqio task or mixture, raw and preprocessed.

    python tools/show_task.py bundled_span_corruption [--split validation] [-n 3] \
        [--inputs_length 128 --targets_length 32] [--module my_tasks]
    python tools/show_task.py --list

Token ids are shown with their decoded text, sentinels (`<extra_id_N>`) included, so you
can check that a task you registered does what you meant.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from t5x_lite import cli

cli.keep_tensorflow_off_gpus()  # imports TensorFlow without its C++ start-up logs, before seqio does

import seqio

from t5x_lite.data import pipeline
from t5x_lite.data.preprocessors import span_corruption


def show(name: str, split: str, num_examples: int, inputs_length: int, targets_length: int | None, seed: int) -> None:
    """Prints raw source examples, then the preprocessed token ids and their text."""
    provider = pipeline.get_mixture_or_task(name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    if targets_length is None:
        targets_length = span_corruption.random_spans_lengths(inputs_length)[1]
    lengths = {"inputs": inputs_length, "targets": targets_length}
    for task in tasks:
        print(f"=== task {task.name} (split {split}) ===")
        raw = task.source.get_dataset(split=split, shuffle=False, seed=seed)
        for i, example in enumerate(raw.take(num_examples).as_numpy_iterator()):
            print(f"--- raw example {i}")
            fields = example if isinstance(example, dict) else {"text": example}
            for key, value in fields.items():
                print(f"  {key}: {_text(value)}")
        processed = task.get_dataset(lengths, split=split, shuffle=False, seed=seed, num_epochs=1)
        for i, example in enumerate(processed.take(num_examples).as_numpy_iterator()):
            print(f"--- preprocessed example {i}")
            for key, value in example.items():
                feature = task.output_features.get(key.removesuffix("_pretokenized"))
                if feature is not None and not key.endswith("_pretokenized") and np.ndim(value) == 1:
                    print(f"  {key} ({len(value)} ids): {value.tolist()}")
                    print(f"  {key} text: {feature.vocabulary.decode(value.tolist())!r}")
                else:
                    print(f"  {key}: {_text(value)}")


def _text(value) -> str:
    if isinstance(value, bytes):
        return repr(value.decode("utf-8", errors="replace"))
    return repr(value)


def put_working_folder_on_path() -> None:
    """Lets `--module` name a module in the working folder, as `python -m` does (a script gets its own folder,
    tools/, on `sys.path` instead)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="task or mixture name")
    parser.add_argument("--split", default="train")
    parser.add_argument("-n", "--num_examples", type=int, default=2)
    parser.add_argument("--inputs_length", type=int, default=128)
    parser.add_argument("--targets_length", type=int, default=None, help="default: what span corruption needs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--module", default=None, help="module that registers your tasks")
    parser.add_argument("--list", action="store_true", help="list registered tasks and mixtures")
    args = parser.parse_args()
    put_working_folder_on_path()
    try:
        pipeline.import_task_module(args.module)
    except ModuleNotFoundError as e:
        sys.exit(f"error: {e}")
    if args.list or not args.name:
        print("tasks:", ", ".join(sorted(seqio.TaskRegistry.names())))
        print("mixtures:", ", ".join(sorted(seqio.MixtureRegistry.names())) or "(none)")
        return
    show(args.name, args.split, args.num_examples, args.inputs_length, args.targets_length, args.seed)


if __name__ == "__main__":
    main()
