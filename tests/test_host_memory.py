"""t5x_lite.host_memory: large host blocks come from malloc's heap and stay there after free."""

import ctypes
import sys

import pytest

from t5x_lite import host_memory


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


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


def test_opt_out(monkeypatch):
    monkeypatch.setenv(host_memory.OPT_OUT_ENV, "0")
    assert host_memory.keep_freed_host_memory() is False
