"""What the machine computes natively, asked rather than assumed: bf16 on the CPU (AVX-512 BF16, AMX, Arm BF16) or
on the GPU, for `precision="auto"`.

A CPU without bf16 units runs bf16 through a fallback kernel that is many times slower than fp32 (about 50x seen
on an AVX2-only Zen 3), so bf16 is chosen only where the CPU reports the instructions.
"""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache

# /proc/cpuinfo flags (x86) or Features (aarch64) that mean bf16 matrix products run in hardware.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: Linux's /proc/cpuinfo `flags` (x86) or `Features` (Arm); on macOS, the
    `hw.optional.arm.FEAT_*` sysctls that are set (as lower-case names: "bf16", ...); empty where neither exists."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return frozenset(value.split())
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "hw.optional.arm"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return frozenset()
        return frozenset(line.split(":")[0].rsplit("FEAT_", 1)[-1].lower() for line in out.splitlines()
                         if "FEAT_" in line and line.rstrip().endswith(": 1"))  # fmt: skip
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 matrix instructions (x86 AVX-512 BF16 or AMX-BF16; Arm BF16)."""
    return bool(BF16_FLAGS & cpu_flags())


def native_bf16(device_type: str) -> bool:
    """Whether bf16 runs natively on a device of this type ("cpu" or "cuda")."""
    if device_type == "cuda":
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "cpu" and cpu_has_native_bf16()


def resolve_precision(precision: str, device_type: str) -> str:
    """`precision` with "auto" made concrete: "bf16" where the device computes bf16 natively, else "fp32"."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device_type) else "fp32"
