"""t5x_lite.host_memory: large host blocks come from malloc's heap and stay there after free."""

import ctypes
import os
import subprocess
import sys
import textwrap
import types

import jax
import pytest

from t5x_lite import host_memory


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@pytest.fixture(autouse=True)
def restore_async_dispatch():
    """keep_freed_host_memory() switches JAX's CPU dispatch; later tests see the value they started with."""
    value = jax.config.read("jax_cpu_enable_async_dispatch")
    yield
    jax.config.update("jax_cpu_enable_async_dispatch", value)


@pytest.fixture
def libc():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc malloc settings apply on Linux only")
    lib = ctypes.CDLL("libc.so.6")
    if not hasattr(lib, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 for mallinfo2")
    lib.mallinfo2.restype = _Mallinfo2
    lib.malloc.restype, lib.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    lib.free.argtypes = [ctypes.c_void_p]
    return lib


def test_large_blocks_are_heap_blocks_kept_after_free(libc):
    assert host_memory.keep_freed_host_memory()
    size = 96 << 20  # above glibc's largest mmap threshold (32 MiB): mmap-served by default
    before = libc.mallinfo2()
    block = libc.malloc(size)
    assert block
    during = libc.mallinfo2()
    assert during.hblkhd == before.hblkhd, "the block was served by mmap"
    libc.free(block)
    after = libc.mallinfo2()
    assert after.arena == during.arena, "the heap was trimmed back to the OS on free"
    assert after.fordblks >= size  # the freed block waits on the free lists for the next step


def test_accelerator_hosts_keep_glibc_defaults(monkeypatch):
    """A process whose JAX backend is a GPU or TPU never calls mallopt; a CPU one does."""
    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: types.SimpleNamespace(mallopt=mallopt))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert host_memory.keep_freed_host_memory() is False
    assert calls == []
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert host_memory.keep_freed_host_memory() is True
    assert len(calls) == 2


def test_opt_out(monkeypatch):
    monkeypatch.setenv(host_memory.OPT_OUT_ENV, "0")
    assert host_memory.keep_freed_host_memory() is False


FAULTS_PER_RUN = textwrap.dedent("""
    import resource, sys
    from t5x_lite import host_memory
    print("applied", host_memory.keep_freed_host_memory())
    import jax, jax.numpy as jnp
    x = jnp.ones((96 << 20) // 4, jnp.float32)  # 96 MiB: above a thread arena's 64 MiB heaps
    double = jax.jit(lambda x: x * 2.0 + 1.0)
    for _ in range(6):  # until the heap holds every block a run needs
        jax.block_until_ready(double(x))
    faulted = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        jax.block_until_ready(double(x))
        faulted.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 4096 / 2**20)
    print("faulted MiB per run", sorted(faulted)[len(faulted) // 2])
""")


def test_cpu_computations_reuse_their_large_buffers(libc):
    """A computation's 96 MiB output, freed after each run, is not page-faulted in again by the next run
    (with JAX's default asynchronous dispatch a worker thread's arena mmaps it afresh every run). The median
    run counts: on a loaded machine the heap may still grow by a block in one of the ten runs."""
    env = {**os.environ, host_memory.OPT_OUT_ENV: "1"}
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_RUN], check=False, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines())
    assert lines["applied"] == "True"
    assert float(lines["faulted MiB per run"]) < 10, result.stdout
