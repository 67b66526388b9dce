"""Benchmark: the newer model families, clipworks vs OpenCLIP (vs transformers), same weights, fp32.

SigLIP and SigLIP 2 image and text encoding; the Hugging Face text towers (XLM-R, NLLB), which OpenCLIP runs
through transformers and clipworks natively.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # reference.py: OpenCLIP's HF towers offline

from timing import interleaved_rates  # noqa: E402

SIGLIP_MODELS = ("ViT-B-16-SigLIP", "ViT-B-16-SigLIP2")
HF_TEXT_MODELS = ("xlm-roberta-base-ViT-B-32", "nllb-clip-base")


def _models(name: str):
    """OpenCLIP's randomly initialised model, the same weights in clipworks, and in transformers' SiglipModel when
    clipworks can write that layout (None otherwise)."""
    import open_clip

    import clipworks
    from clipworks.checkpoints.open_clip import convert_from_open_clip

    from reference import open_clip_full_model

    torch.manual_seed(0)
    ref = open_clip_full_model(name) if name in HF_TEXT_MODELS else open_clip.create_model(name).eval()
    ours = clipworks.create_model(name)
    ours.load_state_dict(convert_from_open_clip(ref.state_dict(), ours.config))
    hf = None
    if name in HF_TEXT_MODELS:  # no transformers model holds these whole
        return ours, ref, hf
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
    """Captions of 5-20 tokens plus the end token (the start token first where there is one), padded to the context
    length with the pad id, as the models' tokenizers lay them out."""
    t = cfg.text
    g = torch.Generator().manual_seed(1)
    tokens = torch.full((batch, t.context_length), t.pad_id)
    start = int(t.kind != "transformer")  # XLM-R's <s>, NLLB's language code: position 0
    for row, n in enumerate(torch.randint(5, 21, (batch,), generator=g).tolist()):
        tokens[row, start : start + n] = torch.randint(3, t.vocab_size, (n,), generator=g)
        tokens[row, start + n] = getattr(t, "eos_id", 2)
    return tokens


def _text_row(name: str, ours, ref, hf, repeats: int) -> dict:
    tokens = _tokens(ours.config, 256)
    a, b = ours.encode_text(tokens, normalize=True), ref.encode_text(tokens, normalize=True)
    fns = {"clipworks": lambda: ours.encode_text(tokens), "open_clip": lambda: ref.encode_text(tokens)}
    if hf is not None:
        fns["transformers"] = lambda: hf.get_text_features(input_ids=tokens)
    rates = {"transformers": None, **interleaved_rates(fns, 256, repeats)}
    note = f"fp32, 5-20 words padded to {tokens.shape[1]}; max|diff| vs open_clip {float((a - b).abs().max()):.1e}"
    return {"task": f"text encoding {name}, batch 256", "unit": "texts/s", **rates, "note": note}


@torch.inference_mode()
def run(quick: bool = False) -> list[dict]:
    repeats = 3 if quick else 7  # alternating rounds: the medians are compared
    rows = []
    for name in HF_TEXT_MODELS:
        ours, ref, _ = _models(name)
        rows.append(_text_row(name, ours, ref, None, repeats))
    for name in SIGLIP_MODELS:
        ours, ref, hf = _models(name)
        rows.append(_text_row(name, ours, ref, hf, repeats))
        side = ours.config.vision.image_size
        for batch in (1, 32):
            images = torch.randn(batch, 3, side, side)
            n = max(1, (8 if quick else 32) // batch)
            a, b = ours.encode_image(images, normalize=True), ref.encode_image(images, normalize=True)
            fns = {"clipworks": lambda: [ours.encode_image(images) for _ in range(n)],
                   "open_clip": lambda: [ref.encode_image(images) for _ in range(n)]}  # fmt: skip
            if hf is not None:
                fns["transformers"] = lambda: [hf.get_image_features(pixel_values=images) for _ in range(n)]
            rates = {"transformers": None, **interleaved_rates(fns, batch * n, repeats)}
            rows.append({"task": f"image encoding {name}, batch {batch}", "unit": "images/s", **rates,
                         "note": f"fp32; max|diff| vs open_clip {float((a - b).abs().max()):.1e}"})  # fmt: skip
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
