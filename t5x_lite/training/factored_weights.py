"""AANG's factored objective weights (Dery et al. 2022): one logit per stage option plus one per combination.

The objectives are the end task (and any objective that is not a combination: one logit of its own) and
combinations of the objective space (`preprocessors.objective_space`, names `<D>_<T>_<R>_<O>`, possibly behind a
task prefix such as `aang_`). The score of objective i is its own logit plus the logits of the stage options it
uses; the weights are the softmax of the scores:

  w_i = softmax_i(logit_i + sum_{options o of i} stage_logit_o)

Each step trains only K combinations, sampled without replacement in proportion to their weights (Gumbel top-k,
keyed by the seed and the step, so a resumed run draws the same ones), plus every non-combination objective; the
weights are renormalised over that set and the others get 0. The meta-gradient signal (cosine_i of objective i's
body gradient with the dev head's) moves logit_i and, spread by the chain rule (a stage logit enters the score of
every combination that uses it), each stage-option logit by the sum over the sampled combinations that use it:

  logit_i += lr * cosine_i,   stage_logit_o += lr * sum_{sampled i using o} cosine_i

State (checkpointed with the train state): `logits` [n], `stage_logits` [options], `step` (the draws' counter).
Bound in gin as `EndTaskAware.weighting = @FactoredWeighting()` (gin_configs/examples/tartan_aang.gin). The
step still computes every objective's loss and gradient (one vmapped program); the unsampled ones get weight 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import cli
from t5x_lite.data import objective_stages

META_LR = 5e-2


def stage_options() -> list[tuple[str, str]]:
    """Every (stage, option) of the space, in `objective_stages.STAGES` order: the stage logits' order."""
    return [(stage, option) for stage, options in objective_stages.STAGES.items() for option in options]


def parse_combination(name: str) -> objective_stages.Combination | None:
    """The combination an objective name ends in (after any `prefix_`), or None (e.g. the end task)."""
    parts = name.split("_")
    if len(parts) < len(objective_stages.STAGES):
        return None
    combination = objective_stages.Combination(*parts[-len(objective_stages.STAGES):])
    known = all(o in objective_stages.STAGES[s] for s, o in zip(objective_stages.STAGES, combination))
    return combination if known and objective_stages.exclusion_reason(combination) is None else None


def membership(names: Sequence[str]) -> np.ndarray:
    """[n, options] float32: 1 where objective i uses stage option o (a row of zeros for a non-combination)."""
    index = {option: j for j, option in enumerate(stage_options())}
    matrix = np.zeros((len(names), len(index)), np.float32)
    for i, name in enumerate(names):
        combination = parse_combination(name)
        for stage, option in zip(objective_stages.STAGES, combination or ()):
            matrix[i, index[(stage, option)]] = 1.0
    return matrix


@gin.configurable(module="t5x_lite")
class FactoredWeighting:
    """AANG's weighting method in `training.weighting`'s protocol (see the module docstring): `k` combinations per
    step (None: all of them), drawn with `seed`; `meta_lr` moves the logits. `init(names)` reads which stage
    options each objective uses from its name."""

    needs_dev = True

    def __init__(self, k: int | None = None, seed: int = 0, meta_lr: float = META_LR):
        self.k = k
        self.seed = seed
        self.meta_lr = meta_lr
        self.membership = np.zeros((0, len(stage_options())), np.float32)

    @property
    def is_combination(self) -> np.ndarray:
        """[n] bool: which objectives are combinations of the space (the others are always trained)."""
        return self.membership.any(axis=1)

    def init(self, names: Sequence[str]) -> dict[str, jax.Array]:
        """Zero logits (equal weights) and the draws' counter at 0; a ValueError unless `names` hold 1 to K
        combinations of the space."""
        self.membership = membership(names)
        count = int(self.is_combination.sum())
        if not count:
            raise ValueError(f"FactoredWeighting needs combinations of the objective space among the objectives "
                             f"{list(names)} (names ending in <data>_<transform>_<representation>_<output>).")
        if self.k is not None and not 1 <= self.k <= count:
            raise ValueError(f"FactoredWeighting.k={self.k} combinations per step must lie between 1 and the {count} "
                             "combinations among the objectives.")
        return {"logits": jnp.zeros((len(names),), jnp.float32),
                "stage_logits": jnp.zeros((self.membership.shape[1],), jnp.float32),
                "step": jnp.zeros((), jnp.int32)}

    def scores(self, state: dict[str, jax.Array]) -> jax.Array:
        """[n]: each objective's logit plus those of the stage options it uses."""
        return state["logits"] + jnp.asarray(self.membership) @ state["stage_logits"]

    def full_weights(self, state: dict[str, jax.Array]) -> jax.Array:
        """[n]: the softmax of the scores over every objective (before sampling)."""
        return jax.nn.softmax(self.scores(state))

    def sampled(self, state: dict[str, jax.Array]) -> jax.Array:
        """[n] bool: the objectives trained at `state["step"]`: every non-combination and K combinations drawn
        without replacement in proportion to their weights (Gumbel top-k keyed by seed and step)."""
        is_combination = jnp.asarray(self.is_combination)
        k = int(self.is_combination.sum()) if self.k is None else self.k
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), state["step"])
        keys = jnp.where(is_combination, self.scores(state) + jax.random.gumbel(key, is_combination.shape), -jnp.inf)
        return jnp.logical_or(~is_combination, keys >= jnp.sort(keys)[-k])

    def weights(self, state: dict[str, jax.Array]) -> jax.Array:
        """[n]: the full weights renormalised over this step's sampled objectives, 0 elsewhere."""
        kept = jnp.where(self.sampled(state), self.full_weights(state), 0.0)
        return kept / jnp.sum(kept)

    def update(self, state: dict[str, jax.Array], cosines: jax.Array, losses: jax.Array) -> dict[str, jax.Array]:
        """Moves the sampled objectives' logits and their stage options' by the cosines; advances the draws."""
        signal = jnp.where(self.sampled(state), cosines, 0.0) * self.meta_lr
        return {"logits": state["logits"] + signal,
                "stage_logits": state["stage_logits"] + jnp.asarray(self.membership).T @ signal,
                "step": state["step"] + 1}


@gin.configurable(module="t5x_lite")
def objective_space_auxiliaries(
    prefix: str = "aang",
    data: Sequence[str] = objective_stages.DATA,
    transforms: Sequence[str] = objective_stages.TRANSFORMS,
    representations: Sequence[str] = objective_stages.REPRESENTATIONS,
    outputs: Sequence[str] = objective_stages.OUTPUTS,
    dev_fraction: float | None = None,
) -> dict[str, str]:
    """{combination name: task name `<prefix>_<name>`} for the valid combinations of the given stage options: the
    auxiliaries of an AANG run (`EndTaskAware.auxiliaries = @objective_space_auxiliaries()`; the tasks must be
    registered, as `t5x_lite.tasks.aang` registers `aang_*`). With the run's `dev_fraction`, the combinations that
    train on the end task's answers (O=task) read only the part of its train split the end task trains on, never
    the dev head's examples (`multi_objective.slice_task`). A misspelt option is a `cli.UserError`."""
    from t5x_lite.data import multi_objective  # reads data (TensorFlow): only when a run names its auxiliaries

    with cli.user_errors(ValueError):
        found = objective_stages.combinations(data, transforms, representations, outputs)
    if not found:
        raise cli.UserError("objective_space_auxiliaries: no valid combination of the options "
                            f"{[list(data), list(transforms), list(representations), list(outputs)]} (see the rules "
                            "in t5x_lite/data/objective_stages.py).")
    tasks = {c.name: f"{prefix}_{c.name}" for c in found}
    if dev_fraction is not None:
        tasks.update({c.name: multi_objective.slice_task(tasks[c.name], "train", dev_fraction)
                      for c in found if c.output == "task"})
    return tasks
