"""Host-memory allocator settings that make XLA's CPU executions fast: freed memory is kept for reuse.

XLA on the CPU allocates an executable's temporaries and outputs afresh on every run. glibc's malloc
serves blocks above its mmap threshold with `mmap`, unmaps them on free and trims its heaps, so every
train step faulted its large buffers in again, page by page. With mmap and trimming off, freed blocks
stay on malloc's free lists and the next step reuses them (as PyTorch's caching allocators do); the
process keeps its peak footprint. That holds on the main thread's heap only: a block larger than a
thread arena's heap (64 MiB) is mmap-served whatever mallopt says, and JAX's asynchronous dispatch ran
each step's temporaries on a worker thread, so single-device CPU computations run on the calling thread
(`jax_cpu_enable_async_dispatch` off); multi-device ones stay asynchronous. The measured effect is in
docs/performance.md. A process whose JAX backend is a GPU or TPU keeps glibc's defaults.

The entry points (after joining a multi-host run) and `tools/{benchmark,profile_step,pretraining_helps}.py`
call `keep_freed_host_memory()` first; library users can call it too. `T5X_LITE_KEEP_HOST_MEMORY=0` opts out.
"""

from __future__ import annotations

import ctypes
import os
import sys

import jax
from absl import logging

OPT_OUT_ENV = "T5X_LITE_KEEP_HOST_MEMORY"
# mallopt parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_host_memory() -> bool:
    """Where JAX computes on the CPU: tells glibc malloc never to serve blocks with mmap and never to trim its
    heaps, and JAX to run single-device CPU computations on the calling thread; returns whether it did.

    A no-op (False) off Linux, with a C library other than glibc, when T5X_LITE_KEEP_HOST_MEMORY=0, or when
    JAX's default backend is not the CPU. Finding the backend starts JAX's clients, so call it after
    `jax.distributed.initialize` and before the first large allocation and computation. JAX's CPU client
    reads the dispatch setting only when it starts, so that setting is made before the backend is known; it
    concerns computations on the CPU client alone, which a GPU or TPU process hardly runs.
    """
    if os.environ.get(OPT_OUT_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if jax.default_backend() != "cpu":
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 as M_TRIM_THRESHOLD disables trimming (mallopt(3)); 0 as M_MMAP_MAX disables mmap-served blocks.
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, -1) != 1:
        logging.warning("mallopt refused the host-memory settings; XLA CPU buffers will be page-faulted each step.")
        return False
    return True
