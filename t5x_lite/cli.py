"""The command line of the entry points: flags, gin parsing, required macros, process set-up, one-line errors.

`--gin.KEY=VALUE` (T5X's spelling) is rewritten to `--gin_bindings=KEY=VALUE` before absl parses the
command line. Errors a user can fix are raised as `UserError` and printed as one line, without a
traceback. Importing this module is cheap (no TensorFlow, no seqio), so `--help` answers at once.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import importlib
import logging as logging_std
import os
import re
import sys
import tempfile
import tokenize
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
from absl import app, flags, logging
from etils import epath
from gin import config_parser

from t5x_lite import host_memory, storage

FLAGS = flags.FLAGS

GIN_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "gin_configs"

# Modules whose gin configurables the gin files name (the run's `train` among them); imported before the first parse.
CONFIGURABLE_MODULES = ("t5x_lite.configurables", "t5x_lite.training.loop")

MODEL_EXAMPLE = "--gin_file=gin_configs/models/t5_1_1/tiny.gin"
CHECKPOINT_EXAMPLE = "--gin.CHECKPOINT_PATH=\"'runs/my_run'\""


@dataclasses.dataclass(frozen=True)
class Macro:
    """A macro of the shipped run files: what it sets, and an example flag (for errors and `--help`)."""

    sets: str
    example: str


# Every macro of gin_configs/runs/*.gin (tests/test_safety.py keeps the two in step).
MACROS = {
    "MODEL": Macro("the model; a model gin file sets it", MODEL_EXAMPLE),
    "MODEL_DIR": Macro("the run folder: checkpoints, metrics.jsonl, TensorBoard, config.gin",
                       "--gin.MODEL_DIR=\"'runs/my_run'\""),
    "INITIAL_CHECKPOINT_PATH": Macro("runs/finetune.gin: the checkpoint whose parameters a fresh run starts from",
                                     "--gin.INITIAL_CHECKPOINT_PATH=\"'runs/quickstart'\""),
    "CHECKPOINT_PATH": Macro("the checkpoint to use: a MODEL_DIR, its checkpoints/ folder or a step folder",
                             CHECKPOINT_EXAMPLE),
    "MIXTURE_OR_TASK_NAME": Macro("the seqio task or mixture",
                                  "--gin.MIXTURE_OR_TASK_NAME=\"'bundled_span_corruption'\""),
    "MIXTURE_OR_TASK_MODULE": Macro("a Python module to import first, which registers your tasks",
                                    "--gin.MIXTURE_OR_TASK_MODULE=\"'my_tasks'\""),
    "TASK_FEATURE_LENGTHS": Macro("the length of each feature, in tokens",
                                  "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 128, 'targets': 32}\""),
    "TRAIN_STEPS": Macro("the step to train to (a larger value continues a run)", "--gin.TRAIN_STEPS=1000"),
    "BATCH_SIZE": Macro("examples per step (over all devices)", "--gin.BATCH_SIZE=32"),
    "NUM_MICROBATCHES": Macro("gradient accumulation: BATCH_SIZE in this many pieces", "--gin.NUM_MICROBATCHES=2"),
    "RANDOM_SEED": Macro("initialisation, dropout and data order", "--gin.RANDOM_SEED=1"),
    "DROPOUT_RATE": Macro("the model's dropout rate", "--gin.DROPOUT_RATE=0.1"),
    "ACTIVATION_DTYPE": Macro("the activations' dtype", "--gin.ACTIVATION_DTYPE=\"'bfloat16'\""),
    "KERNELS": Macro("hot-path kernels: 'auto', 'xla' or 'cpu_tuned'", "--gin.KERNELS=\"'xla'\""),
    "MESH_SHAPE": Macro("the device mesh", "--gin.MESH_SHAPE=\"{'data': -1, 'fsdp': 2, 'tensor': 1}\""),
    "EVAL_OUTPUT_DIR": Macro("where eval writes metrics.jsonl and TensorBoard",
                             "--gin.EVAL_OUTPUT_DIR=\"'runs/my_run/eval'\""),
    "NUM_SHOTS": Macro("k-shot prompting: solved train examples before each query (0: none)", "--gin.NUM_SHOTS=2"),
    "INFER_INPUT_FILE": Macro("a .txt (one input per line) or .jsonl file to predict for, instead of a task",
                              "--gin.INFER_INPUT_FILE=\"'questions.txt'\""),
    "INFER_OUTPUT_FILE": Macro("the JSONL file of predictions", "--gin.INFER_OUTPUT_FILE=\"'predictions.jsonl'\""),
    "FEATURES_INPUT_FILE": Macro("a text file, one text per line (BERT: a TAB separates a pair), instead of a task",
                                 "--gin.FEATURES_INPUT_FILE=\"'lines.txt'\""),
    "FEATURES_OUTPUT_FILE": Macro("the .npz file of features", "--gin.FEATURES_OUTPUT_FILE=\"'features.npz'\""),
    "FEATURES_SPLIT": Macro("the task split to read", "--gin.FEATURES_SPLIT=\"'train'\""),
    "FEATURE_LAYERS": Macro("the layers to save: 0 embeddings, i block i, -1 the last", "--gin.FEATURE_LAYERS=\"[0, -1]\""),
    "SEQUENCE_LENGTH": Macro("tokens per text", "--gin.SEQUENCE_LENGTH=128"),
}
RUN_MACROS = ("MODEL", "MODEL_DIR", "INITIAL_CHECKPOINT_PATH", "MIXTURE_OR_TASK_NAME", "MIXTURE_OR_TASK_MODULE",
              "TASK_FEATURE_LENGTHS", "TRAIN_STEPS", "BATCH_SIZE", "NUM_MICROBATCHES", "RANDOM_SEED")
MODEL_MACROS = ("DROPOUT_RATE", "ACTIVATION_DTYPE", "KERNELS", "MESH_SHAPE")
EVAL_MACROS = ("MODEL", "CHECKPOINT_PATH", "MIXTURE_OR_TASK_NAME", "MIXTURE_OR_TASK_MODULE", "TASK_FEATURE_LENGTHS",
               "EVAL_OUTPUT_DIR", "NUM_SHOTS")
INFER_MACROS = ("MODEL", "CHECKPOINT_PATH", "MIXTURE_OR_TASK_NAME", "MIXTURE_OR_TASK_MODULE", "INFER_INPUT_FILE",
                "TASK_FEATURE_LENGTHS", "INFER_OUTPUT_FILE")
FEATURES_MACROS = ("MODEL", "CHECKPOINT_PATH", "FEATURES_INPUT_FILE", "MIXTURE_OR_TASK_NAME", "MIXTURE_OR_TASK_MODULE",
                   "FEATURES_SPLIT", "FEATURE_LAYERS", "SEQUENCE_LENGTH", "FEATURES_OUTPUT_FILE")
# The macros each entry point needs (gin_configs/runs/*.gin leave them %gin.REQUIRED), with an example flag.
REQUIRED_MACROS = {
    "MODEL_DIR": "--gin.MODEL_DIR=\"'runs/my_run'\"",
    "MIXTURE_OR_TASK_NAME": "--gin.MIXTURE_OR_TASK_NAME=\"'bundled_span_corruption'\"",
    "TASK_FEATURE_LENGTHS": "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 128, 'targets': 32}\"",
    "TRAIN_STEPS": "--gin.TRAIN_STEPS=1000",
    "BATCH_SIZE": "--gin.BATCH_SIZE=32",
    "MODEL": MODEL_EXAMPLE,
}
EVAL_REQUIRED_MACROS = {
    "MODEL": MODEL_EXAMPLE,
    "CHECKPOINT_PATH": CHECKPOINT_EXAMPLE,
    "MIXTURE_OR_TASK_NAME": "--gin.MIXTURE_OR_TASK_NAME=\"'bundled_qa_mixture'\"",
    "TASK_FEATURE_LENGTHS": "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 320, 'targets': 64}\"",
    "EVAL_OUTPUT_DIR": "--gin.EVAL_OUTPUT_DIR=\"'runs/my_run/eval'\"",
}
INFER_REQUIRED_MACROS = {
    "MODEL": MODEL_EXAMPLE,
    "CHECKPOINT_PATH": CHECKPOINT_EXAMPLE,
    "TASK_FEATURE_LENGTHS": "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 320, 'targets': 64}\"",
    "INFER_OUTPUT_FILE": "--gin.INFER_OUTPUT_FILE=\"'predictions.jsonl'\"",
}
FEATURES_REQUIRED_MACROS = {
    "MODEL": "--gin_file=gin_configs/models/bert/tiny.gin",
    "CHECKPOINT_PATH": CHECKPOINT_EXAMPLE,
    "FEATURES_OUTPUT_FILE": "--gin.FEATURES_OUTPUT_FILE=\"'features.npz'\"",
}


@dataclasses.dataclass(frozen=True)
class EntryHelp:
    """What `--help` shows for an entry point: its command, run file, macros and other common settings."""

    command: str
    run_file: str
    macros: tuple[str, ...]
    settings: str = ""


# Each entry point's help, found by the required macros it checks.
ENTRY_HELP = (
    (REQUIRED_MACROS, EntryHelp(
        "t5x_lite.train", "runs/pretrain.gin (or runs/finetune.gin; gin_configs/quickstart.gin)",
        (*RUN_MACROS, *MODEL_MACROS),
        "train.log_period, train.eval_period, train.eval_steps, train.checkpoint_period, train.best_metric, "
        "checkpoint_manager.keep, run_lease.stale_after_s")),
    (EVAL_REQUIRED_MACROS, EntryHelp("t5x_lite.eval", "runs/eval.gin", (*EVAL_MACROS, *MODEL_MACROS),
                                     "ModelRunner.batch_size, ModelRunner.method")),
    (INFER_REQUIRED_MACROS, EntryHelp("t5x_lite.infer", "runs/infer.gin", (*INFER_MACROS, *MODEL_MACROS),
                                      "infer.split, ModelRunner.batch_size, ModelRunner.method")),
    (FEATURES_REQUIRED_MACROS, EntryHelp("t5x_lite.features", "runs/features.gin", (*FEATURES_MACROS, *MODEL_MACROS),
                                         "save_features.pooling, save_features.max_examples")),
)


class UserError(Exception):
    """A problem with the user's command, config or data, reported without a traceback."""


@contextlib.contextmanager
def user_errors(*errors: type[Exception], setting: str | None = None) -> Iterator[None]:
    """Re-raises `errors` from the block as a `UserError`, prefixed by the setting to change (e.g. MODEL_DIR).

    The one translation from a library's exception to what the command line prints; the block names
    only the exceptions that mean the user's input is at fault, so a bug still shows its traceback.
    """
    try:
        yield
    except errors as e:
        raise UserError(f"{setting}: {e}" if setting else str(e)) from e


def one_line_error(error: Exception) -> str:
    """What the command line prints for an error the user can fix: its first line. An error raised while gin
    calls a configurable (a `UserError` from `train`, or a `FileNotFoundError` from `text_files_task` with a
    pattern that matches nothing) arrives with gin's call-site note ("In call to configurable ...") appended."""
    return str(error).strip().splitlines()[0]


def define_flags() -> None:
    """The flags every entry point takes: gin, TFDS location, multi-host coordination."""
    flags.DEFINE_multi_string("gin_file", [], "gin files to parse, in order (repeatable).")
    flags.DEFINE_multi_string("gin_bindings", [], "gin bindings; also spelled --gin.KEY=VALUE.")
    flags.DEFINE_list(
        "gin_search_paths", [], "Folders to look for gin files and includes in (besides . and gin_configs/)."
    )
    flags.DEFINE_string("tfds_data_dir", None, "Where prepared TFDS datasets live (e.g. for c4/en).")
    flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """Turns `--gin.KEY=VALUE` into `--gin_bindings=KEY=VALUE`."""
    return [f"--gin_bindings={arg[len('--gin.'):]}" if arg.startswith("--gin.") else arg for arg in argv]


# ------------------------------------------------------------------------------------------ gin


def resolve_gin_file(name: str, paths: Sequence[Path]) -> Path:
    """Finds a gin file as given or under a search path; a missing one is a `UserError`."""
    candidate = Path(name)
    if candidate.is_file():
        return candidate
    for folder in paths:
        if (folder / name).is_file():
            return folder / name
    raise UserError(
        f"gin file {name!r} not found (looked in: {', '.join(str(p) for p in paths)}). "
        "Check the path, or add its folder with --gin_search_paths."
    )


_added_search_paths: set[str] = set()


@functools.cache
def _prepare_gin() -> None:
    """Once per process: registers the configurables, and makes gin's Python-path reader tolerant.

    That reader raises TypeError when an include's first folder (e.g. `runs/`) is also a folder in
    the working directory (a namespace package); it then means "not here". gin offers no public way
    to wrap a registered reader's existence check, so its list of readers is rewritten here.
    """
    for module in CONFIGURABLE_MODULES:
        importlib.import_module(module)
    readers = gin.config._FILE_READERS
    readers[:] = [(reader, _tolerant(exists)) for reader, exists in readers]


def _tolerant(exists: Callable[[str], bool]) -> Callable[[str], bool]:
    def check(path: str) -> bool:
        try:
            return exists(path)
        except TypeError:
            return False

    return check


def search_paths(extra_search_paths: Sequence[str] = ()) -> list[Path]:
    """Where gin files and their includes are looked up: the extra paths, the working folder, gin_configs/."""
    return [Path(p) for p in extra_search_paths] + [Path.cwd(), GIN_CONFIGS_DIR]


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], extra_search_paths: Sequence[str] = ()) -> None:
    """Parses files then bindings, looking them and their `include`s up in the extra paths, the cwd and the repo's
    gin_configs; unknown names, bad syntax and missing files become `UserError`s."""
    _prepare_gin()
    paths = search_paths(extra_search_paths)
    for path in paths:
        if str(path) not in _added_search_paths:  # gin keeps (and searches) duplicates
            gin.add_config_file_search_path(str(path))
            _added_search_paths.add(str(path))
    files = [str(resolve_gin_file(f, paths)) for f in gin_files]
    verbosity = logging.get_verbosity()
    # gin logs an ERROR line for every search path an `include` is not in; only real errors count.
    logging.set_verbosity(logging.FATAL)
    try:
        for path in files:
            _parse_or_explain(lambda path=path: gin.parse_config_file(path), f"gin file {path}")
        check_quoting(bindings)
        _parse_or_explain(lambda: gin.parse_config(bindings), "gin bindings")
    finally:
        logging.set_verbosity(verbosity)


def _parse_or_explain(parse: Callable[[], object], what: str) -> None:
    """Runs a gin parse; any syntax or name error becomes a `UserError` naming its source."""
    try:
        parse()
    except tokenize.TokenError as e:  # e.g. an unclosed bracket; gin reports no file for it
        raise UserError(f"invalid {what}: {e.args[0]} (line {e.args[1][0]})") from e
    except (ValueError, SyntaxError, OSError, ImportError) as e:
        raise UserError(f"invalid {what}: {e}") from e


def check_quoting(bindings: Sequence[str]) -> None:
    """A binding whose value is bare text (`MODEL_DIR=runs/x`) is a `UserError` showing the quoted spelling;
    gin would report `malformed node or string ... <ast.Name ...>`."""
    for binding in bindings:
        key, equals, value = (part.strip() for part in binding.partition("="))
        if equals and re.fullmatch(r"[\w./]+", key) and _bare_text(value):
            raise UserError(f"{key} needs a quoted string: --gin.{key}=\"'{value}'\"")


def _bare_text(value: str) -> bool:
    """Whether a binding's value is neither a Python literal nor a gin reference, and holds no quote or bracket."""
    if not value or value[0] in "@%" or any(c in value for c in "'\"[]{}()=\n"):
        return False
    try:
        ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return True
    return False


def require_macros(macros: Mapping[str, str] = REQUIRED_MACROS, given: Collection[str] = ()) -> None:
    """Every macro in `macros`, and every macro a binding reads (e.g. runs/finetune.gin's INITIAL_CHECKPOINT_PATH),
    is bound to a value; a missing one names the macro, a near name among the macros the user set (`given`), and
    an example flag."""
    needed = {**macros, **{name: example(name) for name in sorted(referenced_macros()) if name not in macros}}
    for name, flag in needed.items():
        if _is_unset(name):
            near = _close_name(name, given)
            hint = f" (did you mean {near}?)" if near else ""
            raise UserError(f"gin macro {name} is not set{hint}; set it in a gin file or pass e.g. {flag}")


def _is_unset(name: str) -> bool:
    try:
        value = gin.query_parameter(f"{name}/macro.value")
    except ValueError:
        return True
    return value is gin.REQUIRED or str(value) == "%gin.REQUIRED"


def example(name: str) -> str:
    """An example flag that sets the macro `name`."""
    return MACROS[name].example if name in MACROS else f"--gin.{name}=..."


def _close_name(name: str, candidates: Collection[str]) -> str | None:
    """The candidate most like `name` (a likely typo of it), if one is close."""
    matches = difflib.get_close_matches(name, [c for c in candidates if c != name], n=1, cutoff=0.75)
    return matches[0] if matches else None


# -------------------------------------------------------------------------------- strict config


class _StatementsOnly(config_parser.ParserDelegate):
    """Lets gin's parser list a file's statements without resolving its references."""

    def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> None:
        return None

    def macro(self, macro_name: str) -> None:
        return None


def _statements(text: str) -> list[Any]:
    return list(config_parser.ConfigParser(text, _StatementsOnly()))


def _macros_defined(statements: Sequence[Any]) -> set[str]:
    """The macros the statements set (`NAME = value`: a binding statement without a parameter)."""
    return {f"{s.scope}/{s.selector}" if s.scope else s.selector
            for s in statements if isinstance(s, config_parser.BindingStatement) and not s.arg_name}


def user_set_macros(gin_files: Sequence[str], bindings: Sequence[str], extra_search_paths: Sequence[str] = ()) -> set[str]:
    """The macros the user set: in the bindings, and in gin files outside gin_configs/ (with their own includes).

    Only these must be read by a binding (`check_macros_used`): a shipped file may define a convenience macro that
    a run does not read (e.g. ACTIVATION_DTYPE beside a model file that fixes its dtype).
    """
    paths = search_paths(extra_search_paths)
    names = _macros_defined(_statements("\n".join(bindings)))
    pending, seen = [resolve_gin_file(f, paths) for f in gin_files], set()
    while pending:
        path = pending.pop().resolve()
        if path in seen or path.is_relative_to(GIN_CONFIGS_DIR):
            continue
        seen.add(path)
        statements = _statements(path.read_text(encoding="utf-8"))
        names |= _macros_defined(statements)
        for include in (s for s in statements if isinstance(s, config_parser.IncludeStatement)):
            with contextlib.suppress(UserError):  # gin found it by its own rules; then it is not the user's
                pending.append(resolve_gin_file(include.filename, paths))
    return names


def _parsed_bindings() -> Mapping[tuple[str, str], Mapping[str, Any]]:
    """Gin's parsed bindings, {(scope, selector): {parameter: value}}, references unresolved.

    gin 0.5 keeps them in `gin.config._CONFIG` and hands them only to finalize hooks (`gin.finalize` would also
    lock the config and reject %gin.REQUIRED); this reads them, never writes.
    """
    return gin.config._CONFIG


def _macro_references(value: Any) -> list[str]:
    """The macros `value` reads (`%NAME`, in nested containers too); constants such as %gin.REQUIRED are not macros."""
    macro = gin.get_configurable(gin.config.macro)
    return ["/".join(ref.scopes) for ref in gin.config.iterate_references([value], to=macro)]


def referenced_macros() -> set[str]:
    """The macros the bindings of configurables read, directly or through other macros."""
    macro_values = {key[0]: params.get("value") for key, params in _parsed_bindings().items() if key[1] == "gin.macro"}
    pending = [name for key, params in _parsed_bindings().items() if key[1] != "gin.macro"
               for name in _macro_references(params)]
    found: set[str] = set()
    while pending:
        name = pending.pop()
        if name not in found:
            found.add(name)
            pending.extend(_macro_references(macro_values.get(name)))
    return found


def check_macros_used(given: Collection[str]) -> None:
    """A macro the user set (`given`) that no binding reads is a `UserError` (a typo would be silently ignored)."""
    used = referenced_macros()
    for name in sorted(set(given) - used):
        near = _close_name(name, used)
        hint = f"did you mean {near}?" if near else "check its name, or remove it"
        raise UserError(f"macro {name} is not used by any binding; {hint}")


@dataclasses.dataclass(frozen=True)
class Count:
    """A whole-number setting of a configurable: its lowest valid value and a typical one (for the example)."""

    lowest: int
    typical: int
    note: str = ""


# The whole-number settings checked before any work (a bad one fails deep inside TF, XLA or a modulo).
COUNTS = {
    ("train", "train_steps"): Count(1, 1000),
    ("train", "batch_size"): Count(1, 32),
    ("train", "num_microbatches"): Count(1, 1),
    ("train", "log_period"): Count(1, 100),
    ("train", "eval_period"): Count(0, 1000, " (0: no evaluation)"),
    ("train", "eval_steps"): Count(1, 20),
    ("train", "checkpoint_period"): Count(1, 1000),
    ("ModelRunner", "batch_size"): Count(1, 32),
    ("save_features", "batch_size"): Count(1, 32),
    ("save_features", "sequence_length"): Count(1, 128),
}
# The feature-length settings: every length a whole number >= 1 (a length of 0 crashes TensorFlow).
FEATURE_LENGTHS = (("train", "task_feature_lengths"), ("evaluate_checkpoint", "task_feature_lengths"),
                   ("infer", "task_feature_lengths"))
# Path settings: a quoted string (None where the parameter is optional).
PATHS = (("train", "model_dir"), ("train", "initial_checkpoint_path"), ("evaluate_checkpoint", "checkpoint_path"),
         ("infer", "checkpoint_path"), ("save_features", "checkpoint_path"))


_UNBOUND = object()


def bound_value(selector: str, param: str) -> tuple[str, Any] | None:
    """(the setting's name, its value) as the gin files bind `selector.param`: through a `%MACRO`, the macro's
    name and value; None when it is not bound, or bound to a reference (e.g. `@text_files_task()`, %gin.REQUIRED)."""
    try:
        value = gin.get_bindings(selector, resolve_references=False).get(param, _UNBOUND)
    except (ValueError, KeyError):  # no such configurable in this process (or its short name is ambiguous)
        return None
    through: list[str] = []  # the macros the value is read through, the one the user set first
    while isinstance(value, gin.config.ConfigurableReference):
        macros = _macro_references(value)
        if len(macros) != 1 or _is_unset(macros[0]):
            return None
        through.append(macros[0])
        value = gin.query_parameter(f"{macros[0]}/macro.value")
    if value is _UNBOUND:
        return None
    return (through[0] if through else f"{selector}.{param}"), value


def _flag(name: str, typical: Any) -> str:
    return example(name) if name in MACROS else f"--gin.{name}={typical}"


def check_values() -> None:
    """Counts, feature lengths and paths hold valid values, before any TF or JAX work; a bad one is a `UserError`
    naming the setting and an example fix."""
    for (selector, param), count in COUNTS.items():
        found = bound_value(selector, param)
        if found and not _whole_number(found[1], count.lowest):
            raise UserError(f"{found[0]} must be a whole number >= {count.lowest}{count.note}, got {found[1]!r}; "
                            f"e.g. {_flag(found[0], count.typical)}")
    for selector, param in FEATURE_LENGTHS:
        found = bound_value(selector, param)
        if found:
            check_feature_lengths(*found)
    for selector, param in PATHS:
        found = bound_value(selector, param)
        if found and found[1] is not None and not isinstance(found[1], str):
            raise UserError(f"{found[0]} needs a quoted string, got {found[1]!r}: --gin.{found[0]}=\"'runs/my_run'\"")


def _whole_number(value: Any, lowest: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lowest


def check_feature_lengths(name: str, lengths: Any) -> None:
    """TASK_FEATURE_LENGTHS maps feature names to whole numbers >= 1."""
    flag = _flag(name, "{'inputs': 128, 'targets': 32}")
    if not isinstance(lengths, Mapping):
        raise UserError(f"{name} must map each feature to its length, got {lengths!r}; e.g. {flag}")
    for feature, length in lengths.items():
        if not _whole_number(length, 1):
            raise UserError(f"{name}[{feature!r}] must be a whole number >= 1, got {length!r}; e.g. {flag}")


def check_config(
    gin_files: Sequence[str], bindings: Sequence[str], required_macros: Mapping[str, str] = REQUIRED_MACROS,
    extra_search_paths: Sequence[str] = (),
) -> None:
    """The strict checks after parsing: required macros set (a near name hinted), every macro the user set read
    by a binding, valid values. `gin_files`/`bindings`: what the user gave (a tool's own bindings left out)."""
    given = user_set_macros(gin_files, bindings, extra_search_paths)
    require_macros(required_macros, given)
    check_macros_used(given)
    check_values()


# ------------------------------------------------------------------------------ process set-up


def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Joins a multi-process run: from the flags, or JAX's own detection on SLURM and TPU pods."""
    if coordinator_address or num_processes:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


# seqio warnings about its own bookkeeping that no setting of a run changes (its format strings, matched exactly).
UNACTIONABLE_SEQIO_WARNINGS = frozenset({
    "Task '%s' not cached so using number of input examples instead of preprocessed examples to compute rate.",
    "Features not in `features_length` will be removed during packing: %s",
})


def _actionable(record: logging_std.LogRecord) -> bool:
    """The absl-logger filter that drops `UNACTIONABLE_SEQIO_WARNINGS` and keeps every other record."""
    return record.msg not in UNACTIONABLE_SEQIO_WARNINGS


def filter_unactionable_warnings() -> None:
    """Keeps seqio's `UNACTIONABLE_SEQIO_WARNINGS` out of the console and the log (once per process)."""
    logging.get_absl_logger().addFilter(_actionable)


def native_logs_wanted() -> bool:
    """Whether the user asked for TensorFlow's and XLA's C++ logs: absl's `--verbosity` of 1 or more. Before absl
    has parsed the command line (an entry point that imports TensorFlow at import time) the flag is read from it."""
    if logging.get_verbosity() >= logging.DEBUG:
        return True
    return not FLAGS.is_parsed() and verbosity_in(sys.argv) >= logging.DEBUG


def verbosity_in(argv: Sequence[str]) -> int:
    """The `--verbosity`/`-v` value of a command line as absl reads it, ignoring every other flag (-1 if absent)."""
    only = flags.FlagValues()
    flags.DEFINE_integer("verbosity", -1, "absl's verbosity", short_name="v", flag_values=only)
    try:
        only([argv[0] if argv else "", *argv[1:]], known_only=True)
    except flags.Error:  # e.g. pytest's own -v
        return -1
    return only.verbosity


@contextlib.contextmanager
def native_logs_held() -> Iterator[None]:
    """Holds back what C++ code writes to file descriptor 2 during the block (TensorFlow's CUDA probing and
    oneDNN notices, which no environment variable silences in TF 2.21); on an exception the held text is
    written out before it propagates, so a failed import still explains itself. A no-op with `--verbosity>=1`."""
    if native_logs_wanted():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@functools.cache
def keep_tensorflow_off_gpus() -> None:
    """TensorFlow only reads data here; it must never take accelerator memory from JAX.

    Called by whatever reads data, before the first dataset is built; once TF has set up its devices
    the setting is fixed, and then it was made already. The entry points that import TensorFlow at
    import time (eval, infer, features) call it first, before TF's own start-up callback lists devices.
    TF is imported and its devices set up with their C++ logs held back (`native_logs_held`): oneDNN
    and CUDA-probing notices and, on a CPU-only machine, `failed call to cuInit: ... CUDA error`, which
    is no failure. Unless `--verbosity>=1` (or the user set TF_CPP_MIN_LOG_LEVEL), TF's later C++ INFO
    and WARNING lines are off too, e.g. the notice that an evaluation read part of a cached dataset.
    """
    if not native_logs_wanted() and os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1") == "1":  # unset, or JAX's default
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    with native_logs_held():
        import tensorflow as tf  # only processes that read data pay for TensorFlow

        with contextlib.suppress(RuntimeError):  # devices already set up (data read first)
            tf.config.set_visible_devices([], "GPU")


def setup_runtime() -> None:
    """The process set-up of an entry point, from the flags: quiet library logs unless -v was given (and
    TensorFlow's C++ start-up logs and seqio's unactionable warnings unless --verbosity>=1), join a multi-host
    run, then per backend: keep freed host memory on the CPU (`host_memory`), and TensorFlow off the GPUs;
    point seqio at TFDS data."""
    if not FLAGS["verbosity"].present:  # Library INFO chatter (Orbax, seqio) stays out of the console.
        logging.set_verbosity(logging.WARNING)
    if not native_logs_wanted():
        filter_unactionable_warnings()
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    host_memory.keep_freed_host_memory()
    keep_tensorflow_off_gpus()
    storage.configure()  # gs:// through one client, and to an emulator when STORAGE_EMULATOR_HOST names one
    if FLAGS.tfds_data_dir:
        import seqio

        seqio.set_tfds_data_dir_override(FLAGS.tfds_data_dir)


HELP_ARGS = {"--help", "-h", "-?", "--helpshort"}


def exit_on_help(required_macros: Mapping[str, str]) -> None:
    """With `--help` (or -h) on the command line: prints the entry point's help and exits 0. Entry points that
    import TensorFlow call it first, so the help answers in about a second."""
    if HELP_ARGS & set(sys.argv[1:]):
        print(entry_point_help(required_macros))
        sys.exit(0)


def entry_point_help(required_macros: Mapping[str, str]) -> str:
    """`--help`: the command, then one line per macro of the entry point's run file (what it sets, an example)."""
    entry = next((entry for required, entry in ENTRY_HELP if required is required_macros),
                 EntryHelp("t5x_lite.train", "a run file", tuple(required_macros)))
    width = max(len(name) for name in entry.macros)
    lines = [
        f"USAGE: python -m {entry.command} --gin_file=FILE ... [--gin.NAME=VALUE ...]",
        "",
        f"Start from {entry.run_file} and a model file (gin_configs/models/); set macros in a gin file or as",
        "--gin.NAME=VALUE. A string value needs inner quotes: --gin.MODEL_DIR=\"'runs/my_run'\".",
        "",
        "Macros (* required):",
    ]
    for name in entry.macros:
        flag = required_macros.get(name, example(name))
        mark = "*" if name in required_macros else " "
        lines.append(f" {mark}{name:<{width}}  {MACROS[name].sets}; e.g. {flag}")
    if entry.settings:
        lines += ["", f"Other common settings (--gin.NAME=VALUE): {entry.settings}."]
    lines += ["", ("Flags: --gin_file (repeatable), --gin_search_paths, --tfds_data_dir, --coordinator_address, "
              "--num_processes, --process_id, -v/--verbosity; --helpfull lists every flag.")]
    return "\n".join(lines)


def run_entry_point(run_fn: Callable[[], object], required_macros: Mapping[str, str]) -> None:
    """What `python -m t5x_lite.{train,eval,infer,features}` does: flags, set-up, gin, checks, then `run_fn()`.

    `--gin.KEY=VALUE` works as in T5X, and a `UserError` is printed as one line (exit code 2).
    """
    exit_on_help(required_macros)
    define_flags()

    def main(argv: Sequence[str]) -> None:
        try:
            if len(argv) > 1:
                raise UserError(f"unexpected arguments {list(argv[1:])}; use --gin_file and --gin.KEY=VALUE.")
            setup_runtime()
            parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
            check_config(FLAGS.gin_file, FLAGS.gin_bindings, required_macros, FLAGS.gin_search_paths)
            run_fn()
        except (UserError, FileNotFoundError) as e:
            print(f"error: {one_line_error(e)}", file=sys.stderr)
            sys.exit(2)
        except ValueError as e:
            if not is_config_error(e):
                raise
            print(f"error: {one_line_error(e)}", file=sys.stderr)
            sys.exit(2)

    app.run(main, argv=rewrite_gin_args(sys.argv))


def is_config_error(error: ValueError) -> bool:
    """Whether `error` is a bad config value (`ConfigError`, raised as gin builds MODEL); imported on use, since
    the networks bring JAX, which `--help` does without."""
    from t5x_lite.networks.config_checks import ConfigError

    return isinstance(error, ConfigError)


def load_task(name: str, module: str | None, task_feature_lengths: Mapping[str, int] | None = None) -> Any:
    """The task or mixture MIXTURE_OR_TASK_NAME names, once MIXTURE_OR_TASK_MODULE has registered its tasks, with
    TensorFlow kept off the GPUs and the feature lengths checked when given; a problem is a `UserError`."""
    keep_tensorflow_off_gpus()
    from t5x_lite.data import pipeline  # TensorFlow and seqio: only the processes that read data import them

    with user_errors(ValueError, ModuleNotFoundError):
        pipeline.import_task_module(module)
        provider = pipeline.get_mixture_or_task(name)
        if task_feature_lengths is not None:
            pipeline.check_feature_lengths(provider, task_feature_lengths)
    return provider


def read_lines(path: str, setting: str, what: str) -> list[str]:
    """The non-blank lines of the file `setting` names (any `storage` path), one `what` each; a missing or empty
    file is a `UserError`."""
    file = storage.path(path)
    if not file.is_file():
        raise UserError(f"{setting} {path!r} does not exist.")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{setting} {path!r} is empty; put one {what} per line.")
    return lines


def prepare_output_dir(path: str, setting: str | None = None) -> epath.Path:
    """Creates an output folder (MODEL_DIR, EVAL_OUTPUT_DIR; any `storage` path, gs:// too) and checks it is
    writable, before any work; returns it as an `epath.Path`.

    The probe file's name is unique, so the processes of a multi-host run can check a shared folder at once.
    An unwritable folder is a `UserError` that names `setting` when given.
    """
    folder = storage.path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        prefix = f"{setting} " if setting else ""
        raise UserError(
            f"{prefix}{path!r} is not writable ({e.strerror or e}); pick a folder you can write to, "
            "e.g. \"'runs/my_run'\"."
        ) from e
    return folder
