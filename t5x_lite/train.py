"""`python -m t5x_lite.train --gin_file=... --gin.KEY=VALUE`: pre-train or fine-tune a model.

Only the command line lives here; the run is `t5x_lite.training.loop.train` (also reachable as
`t5x_lite.train.train`), imported once the flags are parsed, so `--help` answers without TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable

from t5x_lite import cli


def __getattr__(name: str) -> Callable[..., dict[str, float]]:
    """`t5x_lite.train.train`, the gin-configurable run, imported on first use."""
    if name != "train":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from t5x_lite.training.loop import train

    return train


def main() -> None:
    """Trains as gin configures `train` (the runner has parsed the gin files by now)."""
    from t5x_lite.training.loop import train

    train()


if __name__ == "__main__":
    cli.run_entry_point(main, cli.REQUIRED_MACROS)
