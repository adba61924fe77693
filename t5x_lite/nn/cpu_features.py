"""Which matmul instructions the host CPU has, read from the operating system (no timing, no compilation).

XLA runs bfloat16 matmuls fast only on CPUs with bf16 dot-product instructions (x86 AVX512-BF16 or AMX,
Arm's BF16 extension). Without them a bf16 x bf16 -> float32 dot is emulated and runs below a float32 one
(2-core AVX2 EPYC: 87 against 112-129 GFLOP/s for a [4096, 512] x [512, 1024] product), so the model
layers feed such CPUs float32 operands instead (`layers.dot_operand_dtype`).
"""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from pathlib import Path

# Linux /proc/cpuinfo flags (x86 "flags", Arm "Features") naming a bf16 dot-product instruction.
BF16_DOT_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def bf16_dot_in_cpuinfo(cpuinfo: str) -> bool:
    """Whether a Linux /proc/cpuinfo text lists a bf16 dot-product instruction on its first processor."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return not BF16_DOT_FLAGS.isdisjoint(value.split())
    return False


@functools.cache
def has_bf16_dot() -> bool | None:
    """Whether this CPU has bf16 dot-product instructions; None where the operating system does not say."""
    if sys.platform.startswith("linux"):
        try:
            return bf16_dot_in_cpuinfo(Path("/proc/cpuinfo").read_text())
        except OSError:
            return None
    if sys.platform == "darwin" and platform.machine() == "arm64":
        try:
            answer = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, check=False
            )
        except OSError:
            return None
        return answer.stdout.strip() == "1" if answer.returncode == 0 else None
    return None
