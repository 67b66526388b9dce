"""Peak memory of reading a single-file checkpoint's text encoder, against the file's size.

Writes an SD 1.x-layout `.safetensors` file of several GB: a full-size CLIP ViT-L/14 text tower (123 M parameters,
fp16, random) under `cond_stage_model.transformer.`, plus a big fake UNet (fp16 zeros under
`model.diffusion_model.`), streamed to disk piece by piece so writing it needs little memory. Then, in a fresh
subprocess each, it measures the peak resident set (`resource.getrusage(...).ru_maxrss`) of
`load_single_file_text_encoders` and, with `--compare-full`, of reading the whole file (`safetensors.torch.load_file`,
what a loader that ignores the layout does). The file is removed at the end unless `--keep`.

Usage: python benchmarks/bench_single_file.py [--unet-gb 3.0] [--dir /tmp] [--compare-full] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PREFIX = "cond_stage_model.transformer.text_model."
PIECE = 256 * 2**20  # bytes per fake UNet tensor, written in one go
WIDTH, LAYERS, VOCAB, CONTEXT = 768, 12, 49408, 77  # CLIP ViT-L/14's text tower (SD 1.x)


def text_shapes() -> dict[str, tuple[int, ...]]:
    """The transformers CLIPTextModel tensors of SD 1.x's text encoder, by single-file key."""
    shapes = {"embeddings.token_embedding.weight": (VOCAB, WIDTH),
              "embeddings.position_embedding.weight": (CONTEXT, WIDTH),
              "final_layer_norm.weight": (WIDTH,), "final_layer_norm.bias": (WIDTH,)}  # fmt: skip
    for i in range(LAYERS):
        block = f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{block}self_attn.{name}.weight"] = (WIDTH, WIDTH)
            shapes[f"{block}self_attn.{name}.bias"] = (WIDTH,)
        shapes[f"{block}mlp.fc1.weight"], shapes[f"{block}mlp.fc1.bias"] = (4 * WIDTH, WIDTH), (4 * WIDTH,)
        shapes[f"{block}mlp.fc2.weight"], shapes[f"{block}mlp.fc2.bias"] = (WIDTH, 4 * WIDTH), (WIDTH,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{block}{norm}.weight"], shapes[f"{block}{norm}.bias"] = (WIDTH,), (WIDTH,)
    return {PREFIX + k: v for k, v in shapes.items()}


def write_file(path: Path, unet_bytes: int) -> int:
    """Stream a safetensors file (8-byte header length, JSON header, data) without holding it in memory."""
    entries: list[tuple[str, tuple[int, ...]]] = list(text_shapes().items())
    entries += [(f"model.diffusion_model.fake_block.{i}.weight", (PIECE // 2,)) for i in range(unet_bytes // PIECE)]
    header, offset = {}, 0
    for name, shape in entries:
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    torch.manual_seed(0)
    zeros = bytes(PIECE)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in entries:
            if name.startswith(PREFIX):
                f.write((torch.randn(shape) * 0.02).half().numpy().tobytes())
            else:
                f.write(zeros)
    return path.stat().st_size


CHILD = """
import resource, sys, time
import torch, clipworks.conditioning as c
from safetensors.torch import load_file

def status(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])

base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the peak below is the read's alone
    f.write("5")
t = time.perf_counter()
if sys.argv[2] == "encoders":
    out = c.load_single_file_text_encoders(sys.argv[1])
    n = sum(p.numel() * p.element_size() for m in out.values() for p in m.parameters())
else:  # every tensor, each page touched (load_file maps the file; a converter then reads every tensor)
    out = load_file(sys.argv[1])
    n = sum(v.numel() * v.element_size() for v in out.values() if v.max() is not None)
print(base, status("VmHWM:"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, n, time.perf_counter() - t)
"""


def measure(path: Path, mode: str) -> dict[str, float]:
    """Memory (MiB) of one read in a fresh interpreter: resident after imports, the peak during the read (VmHWM,
    reset after the imports), and `ru_maxrss`, which Linux carries over from the parent across exec (so it is at
    least this script's own peak: the figure to read is VmHWM's)."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True, check=True)
    base, hwm, maxrss, held, seconds = out.stdout.split()
    kib = 1024.0
    return {"rss_after_imports_mib": int(base) / kib, "peak_rss_mib": int(hwm) / kib,
            "added_mib": (int(hwm) - int(base)) / kib, "ru_maxrss_mib": int(maxrss) / kib,
            "tensors_held_mib": int(held) / 2**20, "seconds": float(seconds)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet-gb", type=float, default=3.0, help="size of the fake UNet, GiB")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the file is written")
    parser.add_argument("--compare-full", action="store_true", help="also measure reading the whole file")
    parser.add_argument("--keep", action="store_true", help="leave the file in place")
    args = parser.parse_args()
    unet = int(args.unet_gb * 2**30) // PIECE * PIECE
    need = unet + 2**30
    free = shutil.disk_usage(args.dir).free
    if free < 2 * need:
        raise SystemExit(f"{args.dir} has {free / 2**30:.1f} GiB free; this run wants {2 * need / 2**30:.1f} GiB")
    work = Path(tempfile.mkdtemp(prefix="bench_single_file.", dir=args.dir))
    path = work / "sd1_single_file.safetensors"
    try:
        t = time.perf_counter()
        size = write_file(path, unet)
        print(f"wrote {path}: {size / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s")
        modes = ["encoders"] + (["full"] if args.compare_full else [])
        for mode in modes:
            r = measure(path, mode)
            print(f"{mode:9s} peak RSS {r['peak_rss_mib']:7.1f} MiB (after imports {r['rss_after_imports_mib']:.1f}, "
                  f"added by the read {r['added_mib']:.1f}; ru_maxrss {r['ru_maxrss_mib']:.1f}); tensors held "
                  f"{r['tensors_held_mib']:.1f} MiB; file {size / 2**20:.0f} MiB; {r['seconds']:.2f} s")  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
