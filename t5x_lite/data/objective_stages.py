"""The stages and options of AANG's objective space and the rules that drop the combinations that make no sense.

Pure Python (no TensorFlow), so the trainer's factored weights read the names too; the preprocessors that make
each combination's examples are `preprocessors.objective_space`, whose docstring says what every option does.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

DATA = ("task", "domain", "general")
TRANSFORMS = ("none", "mask", "replace", "span")
REPRESENTATIONS = ("bi", "l2r", "r2l", "rand")
OUTPUTS = ("denoise", "next", "task")
STAGES = {"data": DATA, "transform": TRANSFORMS, "representation": REPRESENTATIONS, "output": OUTPUTS}

# The rules, in the order `exclusion_reason` applies them (the docs' AANG section lists them).
RULES = (
    "the task's output exists only for the task's own inputs, uncorrupted (O=task needs D=task and T=none)",
    "the task's output read bidirectionally is the end task itself, the primary objective (O=task needs R!=bi)",
    "denoising needs noise (O=denoise needs T!=none)",
    ("the next tokens follow a reading direction (O=next needs R=l2r or r2l; random-factorized prediction "
     "needs the target positions, XLNet's two-stream attention, which a text-to-text decoder lacks)"),
    "span corruption's sentinels stand for spans that only denoising names (T=span needs O=denoise)",
)


class Combination(NamedTuple):
    """One objective of the space: an option of each stage."""

    data: str
    transform: str
    representation: str
    output: str

    @property
    def name(self) -> str:
        """`<D>_<T>_<R>_<O>`, e.g. `task_mask_bi_denoise`: the auxiliary's name in metrics and task names."""
        return "_".join(self)


def exclusion_reason(combination: Combination) -> str | None:
    """The rule (from `RULES`) that excludes `combination`, or None when it makes sense."""
    d, t, r, o = combination
    broken = (
        o == "task" and (d != "task" or t != "none"),
        o == "task" and r == "bi",
        o == "denoise" and t == "none",
        o == "next" and r not in ("l2r", "r2l"),
        t == "span" and o != "denoise",
    )
    return next((rule for rule, b in zip(RULES, broken) if b), None)


def check_options(stage: str, options: Sequence[str]) -> tuple[str, ...]:
    """`options` of `stage`, checked: known, none repeated, at least one."""
    known = STAGES[stage]
    unknown = [o for o in options if o not in known]
    if unknown or not options or len(set(options)) != len(options):
        raise ValueError(f"objective space: the {stage} options {list(options)} must be distinct values from "
                         f"{list(known)}, at least one.")
    return tuple(options)


def combinations(
    data: Sequence[str] = DATA,
    transforms: Sequence[str] = TRANSFORMS,
    representations: Sequence[str] = REPRESENTATIONS,
    outputs: Sequence[str] = OUTPUTS,
) -> list[Combination]:
    """The valid combinations of the given stage options, in product order (57 with every option)."""
    stages = [check_options(s, o) for s, o in zip(STAGES, (data, transforms, representations, outputs))]
    product = (Combination(*c) for c in itertools.product(*stages))
    return [c for c in product if exclusion_reason(c) is None]
