"""Benchmark: text and image encoding throughput, clipworks vs OpenCLIP vs transformers, same weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import best_rate  # noqa: E402


def _models(name: str = "ViT-B-32"):
    """The same random weights in all three libraries: OpenCLIP's, converted into clipworks and transformers."""
    import open_clip

    import clipworks
    from clipworks.checkpoints.open_clip import convert_from_open_clip

    torch.manual_seed(0)
    ref = open_clip.create_model(name).eval()
    ours = clipworks.create_model(name)
    cfg = ours.config
    ours.load_state_dict(convert_from_open_clip(ref.state_dict(), cfg))
    hf = None
    try:
        import transformers

        from clipworks.checkpoints.transformers import config_to_transformers, convert_to_transformers

        hf = transformers.CLIPModel(transformers.CLIPConfig.from_dict(config_to_transformers(cfg))).eval()
        hf.load_state_dict(convert_to_transformers(ours.state_dict()), strict=False)
    except ImportError:
        pass
    return ours, ref, hf


def _features(out):
    # transformers 5.x returns an output object from get_*_features; 4.x returned the tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.inference_mode()
def run(quick: bool = False) -> list[dict]:
    from corpus import ordinary_captions

    import clipworks

    ours, ref, hf = _models()
    repeats = 2 if quick else 5
    rows = []

    captions = ordinary_captions(256, seed=1)
    tokens = clipworks.get_tokenizer("ViT-B-32")(captions)  # (256, 77)
    a = ours.encode_text(tokens, normalize=True)
    b = torch.nn.functional.normalize(ref.encode_text(tokens), dim=-1)
    diffs = [f"max|diff| vs open_clip {float((a - b).abs().max()):.1e}"]
    rates = {
        "clipworks": best_rate(lambda: ours.encode_text(tokens), 256, repeats),
        "open_clip": best_rate(lambda: ref.encode_text(tokens), 256, repeats),
        "transformers": None,
    }
    if hf is not None:
        c = torch.nn.functional.normalize(_features(hf.get_text_features(input_ids=tokens)), dim=-1)
        diffs.append(f"vs transformers {float((a - c).abs().max()):.1e}")
        rates["transformers"] = best_rate(lambda: hf.get_text_features(input_ids=tokens), 256, repeats)
    longest = int((tokens == 49407).int().argmax(-1).max()) + 1
    rows.append({"task": "text encoding ViT-B-32, batch 256", "unit": "texts/s", **rates,
                 "note": f"captions of 5-20 words padded to 77 (longest {longest}); " + ", ".join(diffs)})  # fmt: skip

    for batch in (1, 32):
        images = torch.randn(batch, 3, 224, 224)
        n = max(1, (8 if quick else 32) // batch)
        a = ours.encode_image(images, normalize=True)
        b = torch.nn.functional.normalize(ref.encode_image(images), dim=-1)
        rates = {
            "clipworks": best_rate(lambda: [ours.encode_image(images) for _ in range(n)], batch * n, repeats),
            "open_clip": best_rate(lambda: [ref.encode_image(images) for _ in range(n)], batch * n, repeats),
            "transformers": None,
        }
        if hf is not None:
            rates["transformers"] = best_rate(
                lambda: [hf.get_image_features(pixel_values=images) for _ in range(n)], batch * n, repeats
            )
        rows.append({"task": f"image encoding ViT-B-32, batch {batch}", "unit": "images/s", **rates,
                     "note": f"fp32; max|diff| vs open_clip {float((a - b).abs().max()):.1e}"})  # fmt: skip
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
