"""Lists a run's checkpoints: step, time, size and whether Orbax committed it.

    python tools/list_checkpoints.py runs/my_run

A `partial` row is a temporary folder left by a write that was interrupted (kill -9, a
crash, a full disk); training never restores it, and the next run removes it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from t5x_lite import checkpoints


def format_table(infos: Sequence[checkpoints.CheckpointInfo]) -> str:
    """One line per checkpoint under a header, oldest step first, and the total size."""
    lines = [f"{'step':>10}  {'time (UTC)':<19}  {'size':>10}  {'status':<8}  path"]
    for info in infos:
        lines.append(
            f"{info.step:>10}  {info.time.strftime('%Y-%m-%d %H:%M:%S'):<19}  {human_size(info.size_bytes):>10}  "
            f"{'complete' if info.complete else 'partial':<8}  {info.path}"
        )
    lines.append(f"{len(infos)} checkpoint(s), {human_size(sum(i.size_bytes for i in infos))} in all")
    return "\n".join(lines)


def human_size(size: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    power = 0
    while size >= 1024 and power < len(units) - 1:
        size, power = size / 1024, power + 1
    return f"{size:.0f} B" if power == 0 else f"{size:.1f} {units[power]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a run's MODEL_DIR (its checkpoints are in MODEL_DIR/checkpoints)")
    args = parser.parse_args(argv)
    if not checkpoints.checkpoints_dir(args.model_dir).is_dir():
        print(f"error: {args.model_dir!r} has no checkpoints folder; is it a t5x_lite MODEL_DIR?", file=sys.stderr)
        return 2
    print(format_table(checkpoints.list_checkpoints(args.model_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
