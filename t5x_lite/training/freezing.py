"""Selective fine-tuning: train only some parameters, and unfreeze more of them as training goes on.

A selection names parameters by their paths in the params tree, e.g. `encoder/layers/3/mlp/wo/kernel`,
`decoder/decoder_norm/scale`, `token_embedder/embedding`, `logits_dense/kernel`. It is one term or a
list of terms; the trainable set is the union of the terms, minus the terms written with a leading `-`
(only `-` terms: everything minus those). Terms:
  all                          every parameter
  top_k_layers=K               the last K layers of every layer stack (T5/BART: encoder and decoder;
                               GPT, BERT: their one stack)
  top_k_encoder_layers=K       the last K encoder layers (top_k_decoder_layers=K likewise)
  layer_norms                  every norm's scale (and bias): `layer_norms_only` is the same
  heads                        the output head (T5: `logits_dense`; classification heads of other
                               families): `heads_only` is the same
  embeddings                   token (and position) embeddings: `-embeddings` freezes them
  anything else                a regular expression searched in each path, e.g. 'decoder/layers/[45]/'
A term that matches no parameter is an error (a typo would otherwise freeze the model silently).

In gin: `train.optimizer = @selective`, `selective.optimizer = @adafactor`, and `selective.trainable = [...]`, or
`selective.stages = [(0, 'top_k_layers=2'), (1000, 'layer_norms'), (2000, 'all')]` to unfreeze gradually, each
stage adding to the last (docs/finetuning.md shows a run). Frozen parameters get optax's `set_to_zero()` (no
optimizer state, bit-identical); each stage's parameters get their own optimizer inside `conditionally_mask`:
zero updates until the stage's step, then as if training began there, with the schedule read at the global
step. Stage steps count optimizer updates (the train step, unless non-finite steps were skipped); anything
global inside the optimizer, such as AdamW's gradient-norm clipping, sees each stage's parameters separately.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence

import gin
import jax
import optax

from t5x_lite import partitioning

FROZEN = "frozen"
TRAINABLE = "trainable"
Selection = str | Sequence[str]

# Norm parameters: any module whose name contains "norm" (T5: pre_*_layer_norm, encoder_norm, ...).
LAYER_NORM_PATTERN = r"(^|/)[^/]*norm[^/]*/(scale|bias)$"
# Output heads: T5's untied logits layer, and the head module names other families use.
HEAD_PATTERN = r"^(logits_dense|lm_head|classifier|classification_head|qa_head|pooler)(/|$)"
# Input embeddings: modules named *embedder (token_embedder, position_embedder, ...).
EMBEDDING_PATTERN = r"(^|/)[^/]*embedder/"
ALIASES = {"layer_norms_only": "layer_norms", "heads_only": "heads"}
PATTERNS = {"layer_norms": LAYER_NORM_PATTERN, "heads": HEAD_PATTERN, "embeddings": EMBEDDING_PATTERN}


def param_paths(params) -> list[str]:
    """'a/b/c' path of every leaf of a params tree (int layer keys as digits)."""
    return list(partitioning.named_leaves(params))


def _layer_stacks(paths: Sequence[str]) -> dict[str, list[str]]:
    """Paths by layer stack: the path prefix ending in a `...layers` module (T5 `encoder/layers`, GPT and
    BERT `layers`, BART `encoder_layers`)."""
    stacks: dict[str, list[str]] = {}
    for path in paths:
        if match := re.match(r"((?:[^/]+/)*?[^/]*layers)/", path):
            stacks.setdefault(match.group(1), []).append(path)
    return stacks


def _top_layers(term: str, which: str | None, k: int, paths: Sequence[str]) -> set[str]:
    """The last `k` layers of every layer stack (only the encoder's or decoder's when `which` says so)."""
    if k < 1:
        raise ValueError(f"Selection term {term!r}: K must be >= 1.")
    selected: set[str] = set()
    for stack, in_stack in _layer_stacks(paths).items():
        if which and not stack.startswith(which):
            continue
        layer_of = {p: int(m.group(1)) for p in in_stack if (m := re.match(rf"{re.escape(stack)}/(\d+)/", p))}
        if not layer_of:
            raise ValueError(
                f"Selection term {term!r} needs per-layer parameters, but the {stack} are stacked "
                "(scan_layers=True); set the config's scan_layers = False to select layers."
            )
        top = sorted(set(layer_of.values()))[-k:]
        selected |= {p for p, layer in layer_of.items() if layer in top}
    return selected


def _match(term: str, paths: Sequence[str]) -> set[str]:
    """The paths one (positive) term selects; raises if none."""
    name = ALIASES.get(term, term)
    top = re.fullmatch(r"top_k(_encoder|_decoder)?_layers=(-?\d+)", name)
    if name == "all":
        selected = set(paths)
    elif top:
        selected = _top_layers(term, top.group(1) and top.group(1)[1:], int(top.group(2)), paths)
    else:
        try:
            pattern = re.compile(PATTERNS.get(name, name))
        except re.error as e:
            raise ValueError(f"Selection term {term!r} is neither a preset nor a valid regular expression: {e}.") from e
        selected = {p for p in paths if pattern.search(p)}
    if not selected:
        hint = (
            " (with tied input/output embeddings the model has no separate head: its output layer is the embedding)"
            if name == "heads" else ""
        )
        raise ValueError(
            f"Selection term {term!r} matches no parameter{hint}. Parameter paths look like "
            f"{sorted(paths)[:3]}; presets: all, top_k_layers=K, top_k_encoder_layers=K, top_k_decoder_layers=K, "
            "layer_norms, heads, embeddings (a leading '-' freezes)."
        )
    return selected


def select(params, selection: Selection) -> set[str]:
    """The paths of the trainable parameters of `params` under `selection` (see the module doc)."""
    terms = [selection] if isinstance(selection, str) else list(selection)
    if not terms:
        raise ValueError("An empty selection trains nothing; use 'all' to train every parameter.")
    paths = param_paths(params)
    include = [_match(t, paths) for t in terms if not t.startswith("-")]
    exclude = [_match(t[1:], paths) for t in terms if t.startswith("-")]
    trainable = set().union(*include) if include else set(paths)
    trainable -= set().union(*exclude)
    if not trainable:
        raise ValueError(f"Selection {terms} leaves no trainable parameter.")
    return trainable


def _check_stages(stages: Sequence[tuple[int, Selection]]) -> list[tuple[int, Selection]]:
    stages = [(step, selection) for step, selection in stages]
    steps = [step for step, _ in stages]
    if not stages or steps[0] != 0:
        raise ValueError(f"selective.stages must start at step 0, got steps {steps}.")
    if any(not isinstance(s, int) or s < 0 for s in steps) or steps != sorted(set(steps)):
        raise ValueError(f"selective.stages steps must be increasing integers >= 0, got {steps}.")
    return stages


def stage_labels(params, stages: Sequence[tuple[int, Selection]]):
    """A tree like `params` labelling each leaf `stage_<i>` (the first stage that trains it) or FROZEN."""
    first_stage: dict[str, int] = {}
    for i, (_, selection) in enumerate(stages):
        for path in select(params, selection):
            first_stage.setdefault(path, i)
    labels = [f"stage_{first_stage[p]}" if p in first_stage else FROZEN for p in param_paths(params)]
    return jax.tree.unflatten(jax.tree.structure(params), labels)


@gin.configurable
def selective(
    learning_rate: optax.Schedule,
    optimizer: Callable[[optax.Schedule], optax.GradientTransformation] = gin.REQUIRED,
    trainable: Selection = "all",
    stages: Sequence[tuple[int, Selection]] | None = None,
) -> optax.GradientTransformation:
    """`optimizer(learning_rate)` on the selected parameters only; the rest stay frozen.

    Either `trainable` (one selection for the whole run) or `stages` ([(step, selection), ...],
    from step 0, each stage adding its selection to the trainable set); see the module doc.
    """
    if stages is None:
        stages = [(0, trainable)]
    elif trainable != "all":
        raise ValueError("Set either selective.trainable or selective.stages, not both.")
    stages = _check_stages(stages)
    transforms = {FROZEN: optax.set_to_zero(), "stage_0": optimizer(learning_rate)}
    for i, (start, _) in enumerate(stages[1:], start=1):
        if callable(learning_rate):
            later = optimizer(lambda count, start=start: learning_rate(count + start))
        else:
            later = optimizer(learning_rate)
        transforms[f"stage_{i}"] = optax.conditionally_mask(later, lambda count, start=start: count >= start)
    return optax.multi_transform(transforms, lambda params: stage_labels(params, stages))


def train_only(optimizer: optax.GradientTransformation, trainable: Collection[str]) -> optax.GradientTransformation:
    """`optimizer` on the parameters at the `trainable` paths only (an adapter run's adapters); the rest frozen
    as `selective` freezes: optax's `set_to_zero()`, no optimizer state, bit-identical after training."""
    trainable = frozenset(trainable)

    def labels(params):
        names = [TRAINABLE if path in trainable else FROZEN for path in param_paths(params)]
        return jax.tree.unflatten(jax.tree.structure(params), names)

    return optax.multi_transform({FROZEN: optax.set_to_zero(), TRAINABLE: optimizer}, labels)
