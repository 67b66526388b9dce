"""Benchmark: SigLIP and SigLIP 2 image and text encoding, clipworks vs OpenCLIP (vs transformers), same weights."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import best_rate  # noqa: E402

MODELS = ("ViT-B-16-SigLIP", "ViT-B-16-SigLIP2")


def _models(name: str):
    """OpenCLIP's randomly initialised model, the same weights in clipworks, and in transformers' SiglipModel when
    clipworks can write that layout (None otherwise)."""
    import open_clip

    import clipworks
    from clipworks.checkpoints.open_clip import convert_from_open_clip

    torch.manual_seed(0)
    ref = open_clip.create_model(name).eval()
    ours = clipworks.create_model(name)
    ours.load_state_dict(convert_from_open_clip(ref.state_dict(), ours.config))
    hf = None
    try:
        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            clipworks.save_pretrained(ours, Path(tmp) / "hf", format="transformers")
            hf = transformers.AutoModel.from_pretrained(Path(tmp) / "hf").eval()
    except (ImportError, ValueError, OSError):
        pass
    return ours, ref, hf


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _tokens(cfg, batch: int) -> torch.Tensor:
    """Captions of 5-20 tokens plus the end token, padded to the context length as SigLIP's tokenizers pad."""
    t = cfg.text
    g = torch.Generator().manual_seed(1)
    tokens = torch.full((batch, t.context_length), t.pad_id)
    for row, n in enumerate(torch.randint(5, 21, (batch,), generator=g).tolist()):
        tokens[row, :n] = torch.randint(3, t.vocab_size, (n,), generator=g)
        tokens[row, n] = t.eos_id
    return tokens


@torch.inference_mode()
def run(quick: bool = False) -> list[dict]:
    repeats = 2 if quick else 5
    rows = []
    for name in MODELS:
        ours, ref, hf = _models(name)
        tokens = _tokens(ours.config, 256)
        a, b = ours.encode_text(tokens, normalize=True), ref.encode_text(tokens, normalize=True)
        rates = {"clipworks": best_rate(lambda: ours.encode_text(tokens), 256, repeats),
                 "open_clip": best_rate(lambda: ref.encode_text(tokens), 256, repeats), "transformers": None}  # fmt: skip
        if hf is not None:
            rates["transformers"] = best_rate(lambda: hf.get_text_features(input_ids=tokens), 256, repeats)
        rows.append({"task": f"text encoding {name}, batch 256", "unit": "texts/s", **rates,
                     "note": f"fp32, padded to {tokens.shape[1]}; max|diff| vs open_clip {float((a - b).abs().max()):.1e}"})  # fmt: skip
        side = ours.config.vision.image_size
        for batch in (1, 32):
            images = torch.randn(batch, 3, side, side)
            n = max(1, (8 if quick else 32) // batch)
            a, b = ours.encode_image(images, normalize=True), ref.encode_image(images, normalize=True)
            rates = {
                "clipworks": best_rate(lambda: [ours.encode_image(images) for _ in range(n)], batch * n, repeats),
                "open_clip": best_rate(lambda: [ref.encode_image(images) for _ in range(n)], batch * n, repeats),
                "transformers": None,
            }
            if hf is not None:
                rates["transformers"] = best_rate(
                    lambda: [hf.get_image_features(pixel_values=images) for _ in range(n)], batch * n, repeats
                )
            rows.append({"task": f"image encoding {name}, batch {batch}", "unit": "images/s", **rates,
                         "note": f"fp32; max|diff| vs open_clip {float((a - b).abs().max()):.1e}"})  # fmt: skip
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
