"""Benchmark: the image towers of models part 2 (issue 15), clipworks vs OpenCLIP, same weights, fp32.

One row per family and batch size: EVA-CLIP, PE-Core, ViTamin and MobileCLIP (timm's trunk in both libraries, so
parity is the expectation; MobileCLIP also fused by `clipworks.reparameterize`, which OpenCLIP does not do), ConvNeXt
large with its MLP head, CLIPA's patch-average pool, DFN's ViT-H-14 at 378px, CoCa's attentional pool. The two are
timed in alternating rounds; the note gives the spread of the per-round ratio.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (model, batch sizes): the big towers at smaller batches, so that a row takes seconds, not minutes, on 2 cores
MODELS = (
    ("EVA02-B-16", (1, 16)),
    ("PE-Core-B-16", (1, 16)),
    ("ViTamin-S", (1, 16)),
    ("MobileCLIP-S2", (1, 16)),
    ("MobileCLIP-B", (1, 16)),
    ("MobileCLIP2-S4", (1, 8)),
    ("convnext_large_d", (1, 8)),
    ("ViT-L-14-CLIPA", (1, 8)),
    ("ViT-H-14-378", (1, 2)),
    ("coca_ViT-B-32", (1, 32)),
)
FUSED = ("MobileCLIP-S2", "MobileCLIP2-S4")  # also timed after clipworks.reparameterize


def _models(name: str):
    """OpenCLIP's randomly initialised model (its tensors perturbed, so no BatchNorm or bias is a no-op) and the same
    weights in clipworks."""
    import open_clip

    import clipworks
    from clipworks.checkpoints.open_clip import convert_from_open_clip

    torch.manual_seed(0)
    ref = open_clip.create_model(name).eval()
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t), alpha=0.02)
    ours = clipworks.create_model(name)
    ours.load_state_dict(convert_from_open_clip(ref.state_dict(), ours.config))
    return ours.eval(), ref


def _row(task: str, ours, ref, images: torch.Tensor, calls: int, rounds: int) -> dict:
    a, b = ours.encode_image(images, normalize=True), ref.encode_image(images, normalize=True)
    fns = {"clipworks": lambda: [ours.encode_image(images) for _ in range(calls)],
           "open_clip": lambda: [ref.encode_image(images) for _ in range(calls)]}  # fmt: skip
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):  # alternate which goes first, so neither always follows the other
        for name in fns if r % 2 == 0 else reversed(fns):
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    items = len(images) * calls
    ratios = [o / c for c, o in zip(times["clipworks"], times["open_clip"])]
    note = (f"fp32; per-round ratio {min(ratios):.2f}-{max(ratios):.2f}x over {rounds} rounds; "
            f"max|diff| vs open_clip {float((a - b).abs().max()):.1e}")  # fmt: skip
    return {"task": task, "unit": "images/s", "open_clip": items / statistics.median(times["open_clip"]),
            "clipworks": items / statistics.median(times["clipworks"]), "transformers": None, "note": note}  # fmt: skip


@torch.inference_mode()
def run(quick: bool = False) -> list[dict]:
    import clipworks

    rounds = 3 if quick else 7
    rows = []
    for name, batches in MODELS:
        ours, ref = _models(name)
        side = ours.config.vision.image_size
        fused = None
        if name in FUSED:
            fused = clipworks.reparameterize(copy.deepcopy(ours))
        for batch in batches:
            images = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch))
            calls = max(1, (4 if quick else 16) // batch) if batch < 8 else 1
            rows.append(_row(f"image encoding {name}, batch {batch}", ours, ref, images, calls, rounds))
            if fused is not None:
                rows.append(_row(f"image encoding {name} reparameterized, batch {batch}", fused, ref, images, calls,
                                 rounds))  # fmt: skip
        del ours, ref, fused
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
