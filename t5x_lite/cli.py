"""The command line of the entry points: flags, gin parsing, required macros, process set-up, one-line errors.

`--gin.KEY=VALUE` (T5X's spelling) is rewritten to `--gin_bindings=KEY=VALUE` before absl parses the
command line. Errors a user can fix are raised as `UserError` and printed as one line, without a
traceback. Importing this module is cheap (no TensorFlow, no seqio), so `--help` answers at once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging as logging_std
import os
import sys
import tempfile
import tokenize
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
from absl import app, flags, logging

from t5x_lite import host_memory

FLAGS = flags.FLAGS

GIN_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "gin_configs"

# Modules whose gin configurables the gin files name (the run's `train` among them); imported before the first parse.
CONFIGURABLE_MODULES = ("t5x_lite.configurables", "t5x_lite.training.loop")

MODEL_EXAMPLE = "--gin_file=gin_configs/models/t5_1_1/tiny.gin"
CHECKPOINT_EXAMPLE = "--gin.CHECKPOINT_PATH=\"'runs/my_run'\""
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


def one_line_error(error: UserError | FileNotFoundError) -> str:
    """What the command line prints for an error the user can fix. A missing file found while gin calls a
    configurable (e.g. `text_files_task` with a pattern that matches nothing) arrives as a `FileNotFoundError`
    with gin's call-site note appended: its first line is the message."""
    return str(error) if isinstance(error, UserError) else str(error).strip().splitlines()[0]


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


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], extra_search_paths: Sequence[str] = ()) -> None:
    """Parses files then bindings, looking them and their `include`s up in the extra paths, the cwd and the repo's
    gin_configs; unknown names, bad syntax and missing files become `UserError`s."""
    _prepare_gin()
    paths = [Path(p) for p in extra_search_paths] + [Path.cwd(), GIN_CONFIGS_DIR]
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


def require_macros(macros: Mapping[str, str] = REQUIRED_MACROS) -> None:
    """Every required macro is bound to a value; a missing one names the macro and a flag."""
    for name, example in macros.items():
        try:
            value = gin.query_parameter(f"{name}/macro.value")
        except ValueError:
            value = gin.REQUIRED
        if value is gin.REQUIRED or str(value) == "%gin.REQUIRED":
            raise UserError(f"gin macro {name} is not set; set it in a gin file or pass e.g. {example}")


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
    if FLAGS.tfds_data_dir:
        import seqio

        seqio.set_tfds_data_dir_override(FLAGS.tfds_data_dir)


def run_entry_point(run_fn: Callable[[], object], required_macros: Mapping[str, str]) -> None:
    """What `python -m t5x_lite.{train,eval,infer,features}` does: flags, set-up, gin, checks, then `run_fn()`.

    `--gin.KEY=VALUE` works as in T5X, and a `UserError` is printed as one line (exit code 2).
    """
    define_flags()

    def main(argv: Sequence[str]) -> None:
        try:
            if len(argv) > 1:
                raise UserError(f"unexpected arguments {list(argv[1:])}; use --gin_file and --gin.KEY=VALUE.")
            setup_runtime()
            parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
            require_macros(required_macros)
            run_fn()
        except (UserError, FileNotFoundError) as e:
            print(f"error: {one_line_error(e)}", file=sys.stderr)
            sys.exit(2)

    app.run(main, argv=rewrite_gin_args(sys.argv))


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
    """The non-blank lines of the file `setting` names, one `what` each; a missing or empty file is a `UserError`."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{setting} {path!r} does not exist.")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{setting} {path!r} is empty; put one {what} per line.")
    return lines


def prepare_output_dir(path: str, setting: str | None = None) -> Path:
    """Creates an output folder (MODEL_DIR, EVAL_OUTPUT_DIR) and checks it is writable, before any work.

    The probe file's name is unique, so the processes of a multi-host run can check a shared folder at once.
    An unwritable folder is a `UserError` that names `setting` when given.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test"):
            pass
    except OSError as e:
        prefix = f"{setting} " if setting else ""
        raise UserError(
            f"{prefix}{path!r} is not writable ({e.strerror}); pick a folder you can write to, "
            "e.g. \"'runs/my_run'\"."
        ) from e
    return folder
