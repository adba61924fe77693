"""How end-task-aware training weights its objectives (TARTAN, Dery et al. 2021): the `Weighting` protocol.

A weighting method is three pure functions over a small state pytree (checkpointed with the train state):

- `init(names) -> state`: the state for the objectives `names` (the end task first, then the auxiliaries);
- `weights(state) -> [n] float32`: each objective's weight in the body's update this step;
- `update(state, cosines, losses) -> state`: the state after a step, given each objective's body-gradient cosine
  with the dev head's end-task gradient ([n], zeros when `needs_dev` is False) and its loss ([n]).

`needs_dev` says whether the step must compute the dev head's gradient (and the cosines) for `update`. A new
method (e.g. AANG's factored weights) implements these four members and is bound with gin
(`end_task_aware.weighting = @my_weighting()`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import gin
import jax
import jax.numpy as jnp

WeightingState = Any  # a pytree of arrays


class Weighting(Protocol):
    """The objectives' weights and how they change from step to step."""

    needs_dev: bool

    def init(self, names: Sequence[str]) -> WeightingState: ...

    def weights(self, state: WeightingState) -> jax.Array: ...

    def update(self, state: WeightingState, cosines: jax.Array, losses: jax.Array) -> WeightingState: ...


@gin.configurable(module="t5x_lite")
class StaticWeighting:
    """MT-TARTAN: fixed weights, `1 / n` each unless `weights` names an objective's own (a `{name: weight}` dict)."""

    needs_dev = False

    def __init__(self, weights: Mapping[str, float] | None = None):
        self.overrides = dict(weights or {})

    def init(self, names: Sequence[str]) -> WeightingState:
        unknown = sorted(set(self.overrides) - set(names))
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"StaticWeighting.weights names {unknown}, which are not objectives.{hint} The "
                             f"objectives are {list(names)}.")
        return {"weights": jnp.asarray([self.overrides.get(name, 1.0 / len(names)) for name in names], jnp.float32)}

    def weights(self, state: WeightingState) -> jax.Array:
        return state["weights"]

    def update(self, state: WeightingState, cosines: jax.Array, losses: jax.Array) -> WeightingState:
        return state


@gin.configurable(module="t5x_lite")
class MetaWeighting:
    """META-TARTAN: weights = softmax(logits); each step logit_i += meta_lr * cosine_i, where cosine_i compares the
    body's gradient under objective i with its gradient under the dev head's end-task loss (the paper's plugin
    uses meta_lr = 5e-2). The logits start at zero (equal weights)."""

    needs_dev = True

    def __init__(self, meta_lr: float = 5e-2):
        self.meta_lr = meta_lr

    def init(self, names: Sequence[str]) -> WeightingState:
        return {"logits": jnp.zeros((len(names),), jnp.float32)}

    def weights(self, state: WeightingState) -> jax.Array:
        return jax.nn.softmax(state["logits"])

    def update(self, state: WeightingState, cosines: jax.Array, losses: jax.Array) -> WeightingState:
        return {"logits": state["logits"] + self.meta_lr * cosines}
