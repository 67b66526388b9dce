"""precision="auto" asks the CPU: bf16 only where it reports bf16 instructions."""

from __future__ import annotations

import pytest

from clipworks import hardware


@pytest.mark.parametrize("flags, expected", [
    ({"fpu", "avx2", "fma"}, "fp32"),  # Zen 3: bf16 would run through a slow fallback
    ({"avx512f", "avx512_bf16", "avx512_vnni"}, "bf16"),  # Zen 4
    ({"avx512f", "amx_tile", "amx_bf16", "amx_int8"}, "bf16"),  # Xeon with AMX
    ({"fp", "asimd", "bf16", "i8mm"}, "bf16"),  # Arm with BF16 (Graviton 3, Apple M2)
    (set(), "fp32"),  # nothing known
])  # fmt: skip
def test_auto_precision_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.resolve_precision("auto", "cpu") == expected
    assert hardware.resolve_precision("fp32", "cpu") == "fp32" and hardware.resolve_precision("bf16", "cpu") == "bf16"


def test_cpu_flags_are_read_from_proc_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path,
                                                                       *a, **k))  # fmt: skip
    hardware.cpu_flags.cache_clear()
    try:
        assert hardware.cpu_flags() == {"fpu", "sse2", "avx512_bf16"} and hardware.cpu_has_native_bf16()
    finally:
        hardware.cpu_flags.cache_clear()
