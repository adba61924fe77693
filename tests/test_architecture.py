"""The package's layering (docs/architecture.md): no import side effects (`import t5x_lite` loads no
TensorFlow and registers nothing; tasks register on lookup), modules that read no data import no TensorFlow,
and the import rules between the layers hold in every module's source."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.subprocess_env import subprocess_env

PACKAGE = Path(__file__).resolve().parents[1] / "t5x_lite"

PROBE = r"""
import importlib, json, sys
import t5x_lite
report = {"after_package": sorted(m for m in ("tensorflow", "seqio", "jax", "gin") if m in sys.modules)}
import seqio
report["tasks_after_package"] = sorted(seqio.TaskRegistry.names())
from t5x_lite.data import pipeline, registration
report["tasks_after_registration"] = sorted(seqio.TaskRegistry.names())
report["mixtures_after_registration"] = sorted(seqio.MixtureRegistry.names())
report["lookup"] = pipeline.get_mixture_or_task("bundled_qa_mixture").name
names = sorted(seqio.TaskRegistry.names())
tasks = {name: seqio.get_mixture_or_task(name) for name in names}
import t5x_lite.tasks
for module in ("bundled", "c4", "qa", "classification"):
    importlib.reload(importlib.import_module(f"t5x_lite.tasks.{module}"))
importlib.reload(t5x_lite.tasks)
report["same_after_reimport"] = sorted(seqio.TaskRegistry.names()) == names and all(
    seqio.get_mixture_or_task(name) is task for name, task in tasks.items())
report["tasks_after_lookup"] = names
print("REPORT" + json.dumps(report))
"""


def test_import_registers_nothing_and_the_first_lookup_registers_the_bundled_tasks():
    result = subprocess.run([sys.executable, "-c", PROBE], check=False, capture_output=True, text=True,
                            env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("REPORT")]
    report = json.loads(line.removeprefix("REPORT"))
    assert report["after_package"] == []  # no tensorflow, seqio, jax or gin
    assert report["tasks_after_package"] == []
    assert report["tasks_after_registration"] == [] and report["mixtures_after_registration"] == []
    assert report["lookup"] == "bundled_qa_mixture"
    assert {"bundled_span_corruption", "c4_span_corruption", "bundled_qa_yes_no", "squad_v1_1_unifiedqa",
            "bundled_tagging", "glue_mnli", "bundled_mlm", "c4_bart_denoising"} <= set(report["tasks_after_lookup"])
    assert report["same_after_reimport"]


def _imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in the file names (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


ENTRY_POINTS = ("t5x_lite.train", "t5x_lite.eval", "t5x_lite.infer", "t5x_lite.features")
# Layer -> the modules it may not import (besides the entry points, which nothing imports).
RULES = {
    "nn": ("t5x_lite.networks", "t5x_lite.models", "t5x_lite.training", "t5x_lite.data", "t5x_lite.tasks",
           "t5x_lite.hf", "t5x_lite.cli", "t5x_lite.checkpoints", "t5x_lite.evaluation"),
    "networks": ("t5x_lite.models", "t5x_lite.training", "t5x_lite.data", "t5x_lite.tasks", "t5x_lite.hf",
                 "t5x_lite.cli", "t5x_lite.checkpoints", "t5x_lite.evaluation"),
    # Adapters sit beside networks: they attach to any network's layers and reuse freezing's path matcher.
    "adapters": ("t5x_lite.models", "t5x_lite.data", "t5x_lite.tasks", "t5x_lite.hf", "t5x_lite.cli",
                 "t5x_lite.checkpoints", "t5x_lite.evaluation", "t5x_lite.training.loop", "t5x_lite.training.steps",
                 "t5x_lite.training.actions", "t5x_lite.training.train_state"),
    "data": ("t5x_lite.models", "t5x_lite.networks", "t5x_lite.nn", "t5x_lite.training", "t5x_lite.cli"),
    "tasks": ("t5x_lite.models", "t5x_lite.networks", "t5x_lite.nn", "t5x_lite.training", "t5x_lite.cli"),
}


def _offenders(files: list[Path], forbidden: tuple[str, ...]) -> set[str]:
    return {
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in files
        for name in _imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    }


def test_each_layer_imports_only_the_layers_below_it():
    for layer, forbidden in RULES.items():
        files = sorted((PACKAGE / layer).rglob("*.py"))
        assert files, layer
        assert not _offenders(files, forbidden + ENTRY_POINTS), layer


def test_nothing_in_the_package_imports_an_entry_point():
    files = [path for path in sorted(PACKAGE.rglob("*.py")) if path.stem not in ("train", "eval", "infer", "features")]
    assert not _offenders(files, ENTRY_POINTS)


MODEL_SIDE = r"""
import sys
import t5x_lite.decoding, t5x_lite.models, t5x_lite.networks.t5, t5x_lite.nn.attention, t5x_lite.partitioning
import t5x_lite.training.steps, t5x_lite.adapters.lora
from jax._src import xla_bridge
t5x_lite.networks.t5.T5Config(kernels="auto")
print("BACKENDS", sorted(xla_bridge._backends))
print("LOADED", sorted(m for m in ("tensorflow", "seqio") if m in sys.modules))
"""


def test_the_model_side_imports_no_tensorflow():
    """Networks, trainer models, decoding and the train step read no data, so they load neither TF nor seqio;
    and building a config starts no JAX backend (the host-memory settings must come before it)."""
    result = subprocess.run([sys.executable, "-c", MODEL_SIDE], check=False, capture_output=True, text=True,
                            env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED []" in result.stdout and "BACKENDS []" in result.stdout
