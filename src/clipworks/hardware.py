"""What the machine computes natively, asked rather than assumed: bf16 on the CPU (AVX-512 BF16, AMX, Arm BF16) or
on the GPU, for `precision="auto"`; and the names of the inference precisions (`clipworks.models.precision`).

A CPU without bf16 units runs bf16 through a fallback kernel that is many times slower than fp32 (about 50x seen
on an AVX2-only Zen 3), so bf16 is chosen only where the CPU reports the instructions, and on the CPU only for a
model wide enough to gain from them (`MIN_BF16_WIDTH`).
"""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache

# The inference precisions (`clipworks.models.precision` applies them; kept here, free of torch, for the CLI's flags):
# the concrete ones, then what `--precision` offers, then everything `apply_precision` takes (OpenCLIP's "amp" names:
# float32 parameters, autocast left to the caller).
PRECISIONS = ("fp32", "bf16", "fp16", "pure_bf16", "pure_fp16", "int8")
AMP = ("amp", "amp_bf16", "amp_bfloat16")
CHOICES = ("auto", *PRECISIONS)
NAMES = (*CHOICES, *AMP)

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


def resolve_precision(precision: str, device_type: str, model=None) -> str:
    """`precision` with "auto" made concrete: "bf16" where the device computes bf16 natively, else "fp32".

    Given the `model`, "auto" on the CPU also keeps a small one in fp32 (`MIN_BF16_WIDTH`): its matrix products are
    too small for the bf16 units to win back the cost of converting activations.
    """
    if precision != "auto":
        return precision
    if not native_bf16(device_type):
        return "fp32"
    if device_type == "cpu" and model is not None and model_width(model) < MIN_BF16_WIDTH:
        return "fp32"
    return "bf16"


# The narrowest tower width at which bf16 inference beats fp32 on the CPU. Measured (Xeon with AMX, 2 shared cores,
# load average 2.9, torch 2.14.1, a ViT at 224 px with its text tower, batch 16, image encoding): bf16 was 0.59x
# fp32's speed at width 64, 1.44x at 128, 1.5-3.4x from 256 to 768.
MIN_BF16_WIDTH = 128


def model_width(model) -> int:
    """A model's width for `MIN_BF16_WIDTH`: the largest of its linear layers' smaller sides (a transformer's width:
    not its MLP's hidden size); 0 for a model without linear layers."""
    import torch

    return max((min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)),
               default=0)  # fmt: skip
