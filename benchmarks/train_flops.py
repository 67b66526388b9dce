"""Model FLOPs utilisation for the training benchmark: FLOPs per sample, the device's peak, GPU memory of a run.

MFU = samples/s x training FLOPs per sample / (peak FLOP/s x devices), with training FLOPs = 3 x the forward pass's
(the backward pass costs twice the forward), the forward counted by `torch.utils.flop_counter` on the real model
(matrix products and attention; element-wise work is not counted, as in the PaLM paper's definition).
"""

from __future__ import annotations

import subprocess
import threading

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by a substring of the device name; first match.
GPU_BF16_PEAK = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
                 ("A10G", 70e12), ("L4", 121e12))  # fmt: skip


def forward_flops(model_name: str, batch: int = 2) -> float:
    """FLOPs of one forward pass of a clipworks model (image and text towers, loss excluded) per sample."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clipworks.train.config import ModelConfig
    from clipworks.train.loop import build_model

    model, tokenizer = build_model(ModelConfig(name=model_name))
    size = model.preprocess_config.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.zeros(batch, 3, *size)
    tokens = tokenizer(["a photo of a small red circle above a large blue square"] * batch)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, tokens)
    return counter.get_total_flops() / batch


def gpu_peak_flops(precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s of GPU 0 at `precision`, its name); (None, name) where the table does not know it."""
    import torch

    name = torch.cuda.get_device_name(0)
    if precision != "bf16":
        return None, name  # fp32 runs on other units (TF32 or CUDA cores): no single peak to quote
    return next((p for key, p in GPU_BF16_PEAK if key in name), None), name


class GpuMemoryPoller(threading.Thread):
    """The highest `nvidia-smi` memory.used (MiB, summed over the GPUs) seen every `interval` s, minus what was in
    use when polling began: a run's peak device memory, allocator cache included."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.done = interval, threading.Event()
        self.baseline = self._used()
        self.peak = self.baseline

    @staticmethod
    def _used() -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout  # fmt: skip
        return sum(float(v) for v in out.split())

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, self._used())

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak - self.baseline
