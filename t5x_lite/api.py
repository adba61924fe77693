"""`t5x_lite.load(path)`: a model to use from Python (a notebook), over the command line's own machinery.

    m = t5x_lite.load("runs/quickstart")                 # a MODEL_DIR, a step folder, or "hf:/models/flan-t5-small"
    m.predict(["question \\n context"])                  # -> ["answer"]
    m.score(["question \\n context"], ["answer"])        # -> [log-likelihood of the answer]
    m.train(examples, steps=100)                         # the `train()` loop of `python -m t5x_lite.train`
    m.evaluate("bundled_qa_extractive")                  # -> {"eval/bundled_qa_extractive/f1": ..., ...}
    m.save("runs/mine")                                  # a checkpoint that eval, infer and fine-tuning accept

Each method parses the run file of the entry point it stands for (runs/infer.gin, runs/eval.gin,
runs/finetune.gin) and the model's own gin bindings, then calls what that entry point calls: the
checkpoint restore, the mesh and sharding rules of `partitioning` (one CPU or a mesh, by MESH_SHAPE),
`evaluation.ModelRunner`, the task's `seqio.Evaluator`, and `training.loop.train`. Gin's configuration
is global to the process: every call replaces it. Reference: docs/api.md.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging as logging_std
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp
import seqio
from absl import logging
from etils import epath

from t5x_lite import checkpoints, cli, evaluation, host_memory, partitioning, storage
from t5x_lite.data import registration, vocab
from t5x_lite.decoding import DecodeConfig
from t5x_lite.models.base import BaseModel
from t5x_lite.training import loop

# The run file each method parses before the model's bindings, as the matching command line does.
INFER_GIN, EVAL_GIN, FINETUNE_GIN = "runs/infer.gin", "runs/eval.gin", "runs/finetune.gin"
# The configurables of the entry points (modules nothing imports), whose bindings in the run files the API skips.
ENTRY_POINT_CONFIGURABLES = ("infer", "evaluate_checkpoint")
# Configurables outside the model whose bindings still belong to it: the vocabulary of its tokens, and the adapters
# (LoRA) its network is built with.
MODEL_SIDE_CONFIGURABLES = ("t5x_lite.data.vocab.get_vocabulary", "t5x_lite.adapters.add_adapters")
# The input and decode lengths of `predict`/`score` when neither the call nor the checkpoint's run gives them.
DEFAULT_TARGETS_LENGTH = 32
LENGTH_MULTIPLE = 8  # lengths fitted to the data are rounded up to this, so that similar calls share a compile

Example = str | Mapping[str, str] | Sequence[str]


@functools.cache
def _set_up_process() -> None:
    """The process set-up of an entry point that a Python session needs (`cli.setup_runtime` without flags)."""
    cli.filter_unactionable_warnings()
    host_memory.keep_freed_host_memory()
    cli.keep_tensorflow_off_gpus()
    storage.configure()


def load(path: str, gin: Sequence[str] = ()) -> Model:
    """The model and parameters at `path`: a MODEL_DIR (its newest checkpoint), a step folder such as
    MODEL_DIR/checkpoints/300, a folder written by `Model.save`, or `hf:/dir` (a Hugging Face model folder).

    `gin`: bindings applied to every later call (e.g. `["ACTIVATION_DTYPE = 'bfloat16'"]`). A path that holds no
    checkpoint is a `cli.UserError` with the command line's words.
    """
    _set_up_process()
    path = str(path)
    if path.startswith("hf:"):
        return _load_hf(path, list(gin))
    with cli.user_errors(FileNotFoundError, setting="CHECKPOINT_PATH"):
        state_dir = checkpoints.find_state_dir(path)
    config = run_config_file(state_dir)
    model_gin, lengths = model_bindings(config.read_text(encoding="utf-8"), str(config))
    return Model(path, model_gin, list(gin), lengths)


def _load_hf(path: str, bindings: list[str]) -> Model:
    """A Hugging Face folder: its model gin as `tools/convert_hf.py` writes it, and its tokenizer when it has one."""
    from t5x_lite import hf  # safetensors and tokenizers: only `hf:` paths need them

    with cli.user_errors(FileNotFoundError, ValueError, setting="CHECKPOINT_PATH"):
        model_gin = hf.model_gin(hf.load_model(path[len("hf:"):]), path)
    try:
        vocabulary = hf.load_vocabulary(path[len("hf:"):])
    except FileNotFoundError:  # a folder without tokenizer files: the bundled vocabulary, as on the command line
        vocabulary = None
    return Model(path, model_gin, bindings, None, vocabulary)


def run_config_file(state_dir: epath.Path) -> epath.Path:
    """The `config.gin` of the run (or `Model.save` folder) that wrote a checkpoint: beside its step folder, or in
    the MODEL_DIR above `checkpoints/<step>` (or `best/<step>`)."""
    step_folder = state_dir.parent
    for folder in (step_folder, step_folder.parent, step_folder.parent.parent):
        if (folder / "config.gin").is_file():
            return folder / "config.gin"
    raise cli.UserError(
        f"No config.gin found for the checkpoint {step_folder}: load() reads the model from its run's "
        "MODEL_DIR/config.gin, which t5x_lite.train writes; load the MODEL_DIR or a step folder inside it."
    )


def model_bindings(config_text: str, source: str) -> tuple[str, dict[str, int] | None]:
    """The bindings of a run's config.gin that define its model (MODEL, what it references, the vocabulary), as
    gin text, and the run's TASK_FEATURE_LENGTHS. The run-level macros the model reads (DROPOUT_RATE,
    ACTIVATION_DTYPE, KERNELS) stay references: the run file of each call sets them, as on the command line."""
    gin.clear_config()
    cli.parse_gin([], [])  # registers the configurables
    with cli.user_errors(ValueError, SyntaxError, setting=source):
        gin.parse_config(config_text, skip_unknown=True)  # a user's own configurables need not be importable here
    bindings = cli._parsed_bindings()
    if ("MODEL", "gin.macro") not in bindings:
        raise cli.UserError(f"{source} sets no MODEL; it is not the config of a t5x_lite run.")
    keys = _reachable(bindings, [("MODEL", "gin.macro")])
    keys += _reachable(bindings, [key for key in bindings if key[1] in MODEL_SIDE_CONFIGURABLES and key not in keys])
    lengths = bindings.get(("TASK_FEATURE_LENGTHS", "gin.macro"), {}).get("value")
    text = "\n".join(_binding_lines(bindings, keys)) + "\n"
    gin.clear_config()
    return text, dict(lengths) if isinstance(lengths, Mapping) else None


def _reachable(bindings: Mapping, start: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The binding keys `start` leads to through references, leaving out the run-level macros (`cli.MACROS`)."""
    found, pending = [], list(start)
    while pending:
        key = pending.pop(0)
        if key in found or key not in bindings or (key[1] == "gin.macro" and key[0] in cli.MACROS and key[0] != "MODEL"):
            continue
        found.append(key)
        for ref in gin.config.iterate_references(list(bindings[key].values())):  # a scoped one reads both
            pending += [("/".join(ref.scopes), ref.configurable.selector), ("", ref.configurable.selector)]
    return found


def _binding_lines(bindings: Mapping, keys: Sequence[tuple[str, str]]) -> list[str]:
    """Gin text for the bindings under `keys`: `NAME = value` for a macro, `scope/selector.param = value` else."""
    lines = []
    for scope, selector in keys:
        for param, value in bindings[(scope, selector)].items():
            target = scope if selector == "gin.macro" else f"{scope + '/' if scope else ''}{selector}.{param}"
            lines.append(f"{target} = {value!r}")
    return lines


def _binding(name: str, value: Any) -> str:
    """`NAME = value` in gin's syntax (Python literals read the same)."""
    return f"{name} = {value!r}"


class Model:
    """A model with its parameters, placed on the mesh of `partitioning.make_mesh()` (MESH_SHAPE).

    `checkpoint_path` is where the parameters came from: `train` fine-tunes from it, and a trained model points
    at its new MODEL_DIR. `feature_lengths`: the lengths of the run the checkpoint comes from (None for `hf:`).
    """

    def __init__(
        self, checkpoint_path: str, model_gin: str, bindings: list[str], feature_lengths: dict[str, int] | None,
        vocabulary: seqio.Vocabulary | None = None,
    ):
        self.checkpoint_path, self.model_gin, self.bindings = checkpoint_path, model_gin, bindings
        self.feature_lengths = feature_lengths
        self._configure(INFER_GIN)
        with cli.user_errors(ValueError):  # e.g. a MESH_SHAPE larger than the device count
            self.mesh = partitioning.make_mesh()
        self.rules = partitioning.logical_axis_rules()
        self.model: BaseModel = _configured_model()
        self.graphdef, self.params = checkpoints.load_checkpoint_params(self.model, checkpoint_path, self.mesh,
                                                                         self.rules)
        self.vocabulary = vocabulary or vocab.get_vocabulary()
        self._runners: dict[tuple[DecodeConfig, int], evaluation.ModelRunner] = {}

    def __repr__(self) -> str:
        return f"<t5x_lite.Model {loop.describe_model(self.model, self.params)} from {self.checkpoint_path}>"

    # ------------------------------------------------------------------ gin

    def _configure(self, run_file: str, bindings: Sequence[str] = ()) -> None:
        """Replaces gin's configuration by the run file, the model's bindings, load()'s and then `bindings`."""
        gin.clear_config()
        cli.parse_gin([], [])  # registers the configurables and gin_configs/ as the search path
        # The entry points' own functions (`infer`, `evaluate_checkpoint`) are what this module stands in for.
        with _quiet_gin_includes():
            gin.parse_config_file(str(cli.GIN_CONFIGS_DIR / run_file), skip_unknown=list(ENTRY_POINT_CONFIGURABLES))
        with cli.user_errors(ValueError, SyntaxError, setting="model gin"):
            gin.parse_config(self.model_gin)
        cli.parse_gin([], [*self.bindings, *bindings])

    # ------------------------------------------------------------------ inference

    def predict(
        self, inputs: Sequence[Example], decode: DecodeConfig | str = "greedy", batch_size: int = 32,
        feature_lengths: Mapping[str, int] | None = None,
    ) -> list[str]:
        """The decoded text for each input (a string, or a dict with `inputs`), as `python -m t5x_lite.infer`
        writes its `prediction`. `decode`: a `DecodeConfig` or a method name ("greedy", "beam", "sample");
        `feature_lengths["targets"]` is the longest decode (default: the checkpoint's run, else 32)."""
        records = self._records(inputs, targets_required=False)
        lengths = self._lengths(records, feature_lengths, fit_targets=False)
        self._configure(INFER_GIN)
        runner = self._runner(decode, batch_size)
        predicted = dict(runner.predict(self.params, self._features(records, lengths), lengths["targets"]))
        return [self.vocabulary.decode(predicted[i]) for i in range(len(records))]

    def score(
        self, inputs: Sequence[Example], targets: Sequence[str] | None = None, batch_size: int = 32,
        feature_lengths: Mapping[str, int] | None = None,
    ) -> list[float]:
        """The log-likelihood of each target given its input (infer's `score`): `targets` beside the inputs, or
        inside them as dicts / (input, target) pairs."""
        if targets is not None:
            if len(targets) != len(inputs):
                raise cli.UserError(f"score() got {len(inputs)} inputs but {len(targets)} targets.")
            inputs = [(_inputs_text(x), t) for x, t in zip(inputs, targets)]
        records = self._records(inputs, targets_required=True)
        lengths = self._lengths(records, feature_lengths, fit_targets=True)
        self._configure(INFER_GIN)
        runner = self._runner("greedy", batch_size)
        scores = dict(runner.score(self.params, self._features(records, lengths)))
        return [scores[i] for i in range(len(records))]

    def _records(self, examples: Sequence[Example], targets_required: bool) -> list[dict[str, str]]:
        if isinstance(examples, (str, Mapping)):
            examples = [examples]
        if not self.model.text_to_text:
            raise cli.UserError(f"{type(self.model).__name__} predicts for a task's examples (labels, tags or masked "
                                "pieces), not for text inputs: use evaluate(task_name) instead.")
        if not examples:
            raise cli.UserError("No examples given: pass a list of strings, dicts or (input, target) pairs.")
        return [_record(example, targets_required, index) for index, example in enumerate(examples)]

    def _lengths(
        self, records: Sequence[Mapping[str, str]], given: Mapping[str, int] | None, fit_targets: bool
    ) -> dict[str, int]:
        """`given`, else inputs fitted to the longest input and targets fitted to the longest target (`fit_targets`)
        or the decode length of the checkpoint's run."""
        if given is not None:
            cli.check_feature_lengths("feature_lengths", given)
            return dict(given)
        lengths = {"inputs": self._fitted(r["inputs"] for r in records)}
        if fit_targets:
            lengths["targets"] = self._fitted(r["targets"] for r in records)
        else:
            lengths["targets"] = (self.feature_lengths or {}).get("targets", DEFAULT_TARGETS_LENGTH)
        return lengths

    def _fitted(self, texts: Any) -> int:
        """The longest text's token count with EOS, rounded up to `LENGTH_MULTIPLE`."""
        longest = max(len(self.vocabulary.encode(text)) for text in texts) + 1
        return -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE

    def _features(self, records: Sequence[Mapping[str, str]], lengths: Mapping[str, int]) -> Any:
        """The records tokenized and converted as `t5x_lite.infer` converts a file of inputs, enumerated."""
        task = registration.records_task(records, self.vocabulary, "api_inputs")
        raw = task.get_dataset(lengths, split="infer", shuffle=False, num_epochs=1)
        return self.model.feature_converter_cls(pack=False)(raw, lengths).enumerate()

    def _runner(self, decode: DecodeConfig | str, batch_size: int) -> evaluation.ModelRunner:
        """The jitted predict/score functions for a decode config and batch size, built once per pair (with the
        inference gin parsed)."""
        eos_id = 1 if self.vocabulary.eos_id is None else int(self.vocabulary.eos_id)
        config = decode if isinstance(decode, DecodeConfig) else _decode_config(decode, eos_id)
        if (config, batch_size) not in self._runners:
            self._runners[(config, batch_size)] = evaluation.ModelRunner(
                self.model, self.graphdef, self.mesh, self.rules, batch_size=batch_size, method=config.method,
                beam_size=config.beam_size, alpha=config.alpha, temperature=config.temperature, top_k=config.top_k,
                top_p=config.top_p, eos_id=config.eos_id,
            )
        return self._runners[(config, batch_size)]

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self, task_name: str, feature_lengths: Mapping[str, int] | None = None, task_module: str | None = None,
        gin: Sequence[str] = (),
    ) -> dict[str, float]:
        """The task's metrics on its validation split, as `python -m t5x_lite.eval` computes them (the task's
        `seqio.Evaluator` over greedy decodes): `{"eval/<task>/<metric>": value}`. `gin`: extra bindings, e.g.
        `["make_evaluator.num_examples = 50"]`."""
        lengths = self._task_lengths(feature_lengths)
        self._configure(EVAL_GIN, gin)
        provider = cli.load_task(task_name, task_module, lengths)
        if not evaluation.has_metrics(provider):
            raise cli.UserError(f"Task {task_name!r} defines no metric functions to evaluate.")
        task_eval = evaluation.task_evaluation(provider, self.model, self.graphdef, self.mesh, self.rules, lengths)
        metrics, _ = evaluation.evaluate(*task_eval, self.params, lengths["targets"])
        return metrics

    def _task_lengths(self, given: Mapping[str, int] | None) -> dict[str, int]:
        lengths = given if given is not None else self.feature_lengths
        if lengths is None:
            raise cli.UserError("feature_lengths is needed for a task: pass e.g. "
                                "feature_lengths={'inputs': 256, 'targets': 32}.")
        cli.check_feature_lengths("feature_lengths", lengths)
        return dict(lengths)

    # ------------------------------------------------------------------ training

    def train(
        self, data: str | Sequence[Example], steps: int, model_dir: str | None = None,
        feature_lengths: Mapping[str, int] | None = None, task_module: str | None = None,
        gin: Sequence[str] = (), **overrides: Any,
    ) -> dict[str, float]:
        """Fine-tunes from `checkpoint_path` for `steps` steps with `training.loop.train`, configured as
        `python -m t5x_lite.train --gin_file=runs/finetune.gin --gin_file=<model> ...` would be; then holds the
        trained parameters and points at the new run. Returns the run's last logged metrics.

        `data`: a task or mixture name, or examples (dicts with `inputs` and `targets`, or (input, target)
        pairs; written to MODEL_DIR/examples.jsonl, without evaluation unless `train.eval_period` is set).
        `model_dir`: the run folder (default: a new temporary one). Settings as keywords (`BATCH_SIZE=8`,
        `**{"train.eval_period": 50}`) or as gin bindings (`gin=["constant_schedule.learning_rate = 3e-4"]`).
        """
        model_dir = model_dir or tempfile.mkdtemp(prefix="t5x_lite_train_")
        if isinstance(data, str):
            name, lengths, defaults = data, self._task_lengths(feature_lengths), []
        else:
            name, lengths = self._examples_task(data, model_dir, feature_lengths)
            defaults = ["train.eval_period = 0"]
        run = [_binding("MODEL_DIR", model_dir), _binding("INITIAL_CHECKPOINT_PATH", self.checkpoint_path),
               _binding("MIXTURE_OR_TASK_NAME", name), _binding("MIXTURE_OR_TASK_MODULE", task_module),
               _binding("TASK_FEATURE_LENGTHS", lengths), _binding("TRAIN_STEPS", steps)]
        user = [*gin, *(_binding(key, value) for key, value in overrides.items())]
        self._configure(FINETUNE_GIN, [*run, *defaults, *user])
        cli.check_config([], user, cli.REQUIRED_MACROS)
        try:
            summary = loop.train()
        except cli.UserError as error:  # raised inside gin's call: without gin's call-site note, as the CLI prints it
            raise cli.UserError(cli.one_line_error(error)) from error
        self._become(load(model_dir, self.bindings))
        return summary

    def _examples_task(
        self, data: Sequence[Example], model_dir: str, feature_lengths: Mapping[str, int] | None
    ) -> tuple[str, dict[str, int]]:
        """Registers the examples as a text-to-text task over MODEL_DIR/examples.jsonl (train and validation
        splits); returns its name and feature lengths (`feature_lengths`, else fitted to the examples)."""
        records = self._records(data, targets_required=True)
        lines = "".join(json.dumps(record) + "\n" for record in records)
        folder = cli.prepare_output_dir(model_dir, setting="MODEL_DIR")
        (folder / "examples.jsonl").write_text(lines, encoding="utf-8")
        name = "api_examples_" + hashlib.sha256(lines.encode()).hexdigest()[:12]
        path = str(folder / "examples.jsonl")
        with cli.user_errors(ValueError):
            registration.register_text_to_text_task(name, {"train": path, "validation": path}, format="jsonl",
                                                    metrics=["squad"], vocabulary=self.vocabulary, overwrite=True)
        return name, self._lengths(records, feature_lengths, fit_targets=True)

    def _become(self, other: Model) -> None:
        """Takes another model's parameters and origin (after training: the new run's)."""
        self.__dict__.update(other.__dict__)

    # ------------------------------------------------------------------ saving

    def save(self, path: str) -> epath.Path:
        """Writes the parameters where the command line reads them: `path/state` (Orbax) with `path/config.gin`
        (the model's bindings), which `CHECKPOINT_PATH`, `INITIAL_CHECKPOINT_PATH` and `load` accept; or, for
        `hf:/dir`, a Hugging Face folder with the tokenizer (families that `t5x_lite.hf` exports)."""
        if path.startswith("hf:"):
            from t5x_lite import hf

            with cli.user_errors(ValueError):
                return hf.write_pretrained(self.params, self.model, path[len("hf:"):], self.vocabulary)
        folder = storage.absolute(path)
        if (folder / "state").exists():
            raise cli.UserError(f"{folder / 'state'} exists already; save to a new folder.")
        cli.prepare_output_dir(str(folder))
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(folder / "state", {"params": self.params})
            checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            (folder / "config.gin").write_text(self.model_gin, encoding="utf-8")
        return folder


@contextlib.contextmanager
def _quiet_gin_includes() -> Iterator[None]:
    """Silences the ERROR line gin logs for every search path an `include` is not in (as `cli.parse_gin` does; gin
    logs through Python's root logger, which absl's handler does not own outside an absl app)."""
    verbosity, disabled = logging.get_verbosity(), logging_std.root.manager.disable
    logging.set_verbosity(logging.FATAL)
    logging_std.disable(logging_std.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging_std.disable(disabled)


def _configured_model() -> BaseModel:
    """The MODEL macro's object, as gin builds it for an entry point's `model = %MODEL`."""
    value = cli._parsed_bindings().get(("MODEL", "gin.macro"), {}).get("value")
    if not isinstance(value, gin.config.ConfigurableReference):
        raise cli.UserError("The model's gin sets no MODEL = @SomeModel().")
    return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn


def _inputs_text(example: Example) -> str:
    if isinstance(example, str):
        return example
    if isinstance(example, Mapping):
        return example["inputs"]
    return example[0]


def _record(example: Example, targets_required: bool, index: int) -> dict[str, str]:
    """`{"inputs": ..., "targets": ...}` from a string, a dict or an (input, target) pair; a text target is
    needed for scoring and training."""
    if isinstance(example, str):
        inputs, targets = example, None
    elif isinstance(example, Mapping) and "inputs" in example:
        inputs, targets = example["inputs"], example.get("targets")
    elif isinstance(example, Sequence) and len(example) == 2:
        inputs, targets = example
    else:
        raise cli.UserError(f"Example {index} is {example!r}: give a string, a dict with 'inputs' (and 'targets') "
                            "or an (input, target) pair.")
    if targets_required and not targets:
        raise cli.UserError(f"Example {index} has no target: scoring and training need (input, target) pairs "
                            "or dicts with 'targets'.")
    return {"inputs": str(inputs), "targets": str(targets or "")}


def _decode_config(method: str, eos_id: int) -> DecodeConfig:
    with cli.user_errors(ValueError):
        return DecodeConfig(method=method, eos_id=eos_id)
