"""Tests for t5x_lite.nn.cpu_features: reading bf16 dot-product instructions from /proc/cpuinfo."""

import sys

import pytest

from t5x_lite.nn import cpu_features

# Trimmed /proc/cpuinfo texts: an AVX2-only EPYC, an AVX-512 EPYC with AVX512-BF16, a Sapphire Rapids Xeon
# (AMX), an Arm Neoverse V1 (BF16) and an Arm Neoverse N1 (no BF16).
AVX2_EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
AVX512_BF16_EPYC = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"
AMX_XEON = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16 svebf16\nCPU implementer\t: 0x41\n"
NEOVERSE_N1 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [(AVX2_EPYC, False), (AVX512_BF16_EPYC, True), (AMX_XEON, True), (NEOVERSE_V1, True), (NEOVERSE_N1, False),
     ("", False)],
)
def test_bf16_dot_instructions_are_read_from_cpuinfo(cpuinfo, expected):
    assert cpu_features.bf16_dot_in_cpuinfo(cpuinfo) is expected


def test_only_the_first_processor_counts():
    assert cpu_features.bf16_dot_in_cpuinfo(AVX2_EPYC + "\n" + AVX512_BF16_EPYC) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_this_machine_gives_an_answer_on_linux(monkeypatch):
    """Linux always states the flags: the answer is a bool, the one the first processor's flag line gives."""
    answer = cpu_features.has_bf16_dot.__wrapped__()  # uncached
    assert answer is not None
    with open("/proc/cpuinfo") as f:
        line = next(line for line in f if line.split(":")[0].strip() in ("flags", "Features"))
    assert answer == bool({"avx512_bf16", "amx_bf16", "bf16"} & set(line.split(":", 1)[1].split()))

    def unreadable(self):
        raise PermissionError("no /proc")

    monkeypatch.setattr(cpu_features.Path, "read_text", unreadable)
    assert cpu_features.has_bf16_dot.__wrapped__() is None  # unknown, not False
