"""Benchmark: RN50 / ConvNeXt image encoding in fp32, clipworks (plain, BN folded, folded + channels-last) vs OpenCLIP.

Same weights in both libraries (OpenCLIP's random init, every float tensor perturbed so no BatchNorm is a no-op,
converted with clipworks' OpenCLIP converter). Each variant is timed in interleaved rounds (the order rotates every
round), so a change in the machine's load hits all alike; a ratio is the median of the per-round ratios to OpenCLIP,
with their min-max spread. `max|diff|` is the largest absolute difference of the normalised embeddings from
OpenCLIP's.

Variants: `plain` is `clipworks.create_model` as built; for ResNets, `folded` after `fold_batchnorm` and
`folded+channels_last` after `optimize_for_inference` (fold, then channels-last conv weights); for ConvNeXt (no
BatchNorm, left alone by `optimize_for_inference`), `channels_last` is the plain model with channels-last weights.

Usage: python benchmarks/bench_convnets.py [--quick] [--models RN50,convnext_base] [--batches 1,16]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch

MODELS = "RN50,convnext_base"  # RN101, RN50x4, convnext_base_w also build offline


def build(name: str):
    """OpenCLIP's model with perturbed random weights, and clipworks' variants of it (name -> model)."""
    from parts.towers import _models  # OpenCLIP's model with perturbed random weights, the same in clipworks

    from clipworks.models.fold import fold_batchnorm, optimize_for_inference

    plain, ref = _models(name)
    models = {"open_clip": ref, "plain": plain}
    folded = copy.deepcopy(plain)
    if fold_batchnorm(folded):  # ConvNeXt has no BatchNorm: no "folded" row
        models["folded"] = folded
        models["folded+channels_last"] = optimize_for_inference(copy.deepcopy(plain))
    else:  # optimize_for_inference leaves ConvNeXt alone; its channels-last layout is timed here for comparison
        models["channels_last"] = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    return models


def time_row(models: dict, images: torch.Tensor, calls: int, rounds: int) -> dict:
    """Images/s of each model (median over rounds), ratios to OpenCLIP (median, min, max), max|diff| to OpenCLIP."""
    ref = models["open_clip"].encode_image(images, normalize=True)
    diffs = {k: float((m.encode_image(images, normalize=True) - ref).abs().max()) for k, m in models.items()}
    fns = {k: (lambda m=m: [m.encode_image(images) for _ in range(calls)]) for k, m in models.items()}
    for fn in fns.values():  # warm-up (oneDNN primitive caches, allocator)
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    items = len(images) * calls
    out = {}
    for k in names:
        ratios = [o / c for c, o in zip(times[k], times["open_clip"])]
        out[k] = {"rate": items / statistics.median(times[k]), "ratio": statistics.median(ratios),
                  "lo": min(ratios), "hi": max(ratios), "diff": diffs[k]}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--models", default=MODELS, help=f"comma-separated OpenCLIP names (default {MODELS})")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per row (default 7, --quick 3)")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {rounds} rounds")  # fmt: skip
    print("| model | batch | variant | images/s | vs open_clip (median, spread) | max abs diff vs open_clip |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name in args.models.split(","):
            models = build(name)
            side = models["plain"].config.vision.image_size
            side = side if isinstance(side, int) else side[0]
            for batch in (int(b) for b in args.batches.split(",")):
                images = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch))
                calls = max(1, 8 // batch)
                for k, r in time_row(models, images, calls, rounds).items():
                    spread = "-" if k == "open_clip" else f"{r['ratio']:.2f}x ({r['lo']:.2f}-{r['hi']:.2f})"
                    print(f"| {name} | {batch} | {k} | {r['rate']:.1f} | {spread} | {r['diff']:.1e} |", flush=True)
            del models
    load = os.getloadavg()
    print(f"# load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
