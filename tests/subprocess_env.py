"""XLA settings of the test processes, and the environment of the commands the tests run in subprocesses."""

from __future__ import annotations

import os

# The tests' tiny models spend far more time compiling than running: XLA's LLVM at -O0 with its older fusion
# emitter compiles a small BART's train step in 13 s instead of 28. Programs mean the same; tools/benchmark.py
# and users run with XLA's defaults.
QUICK_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a process with `devices` simulated CPU devices and the tests' quick compiles."""
    devices_flag = f"--xla_force_host_platform_device_count={devices} " if devices > 1 else ""
    return devices_flag + QUICK_COMPILE_FLAGS


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """This process's environment for a command run as a user runs it (one CPU device unless `devices` says
    otherwise), compiling like the tests, plus `extra` variables."""
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), **extra}
