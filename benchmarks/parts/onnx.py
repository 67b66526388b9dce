"""Benchmark: ONNX Runtime (CPU) vs PyTorch for ViT-B-32's image and text encoders, same random weights.

The ONNX Runtime figure goes in the extra key "onnxruntime" and in the note, with its ratio to PyTorch;
"clipworks" holds PyTorch's. Usage: python benchmarks/parts/onnx.py [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# Run as a script, this file's folder comes first on sys.path and this file, named onnx.py, would shadow the
# onnx package; benchmarks/ goes there instead (for `corpus`).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from timing import best_rate  # noqa: E402


def _max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    """Largest difference between unit-normalised features."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    return float(np.abs(a - torch.nn.functional.normalize(b, dim=-1).numpy()).max())


def _row(task: str, unit: str, torch_rate: float, ort_rate: float, ort_threads_rate: float, note: str) -> dict:
    threads = torch.get_num_threads()
    return {
        "task": f"ONNX Runtime vs PyTorch: {task}",
        "unit": unit,
        "clipworks": torch_rate,
        "open_clip": None,
        "transformers": None,
        "onnxruntime": ort_rate,
        "onnxruntime_threads": ort_threads_rate,
        "note": (f"onnxruntime {ort_rate:,.1f} {unit} = {ort_rate / torch_rate:.2f}x PyTorch (default session "
                 f"options); with intra_op_num_threads={threads}: {ort_threads_rate:,.1f} = "
                 f"{ort_threads_rate / torch_rate:.2f}x; {note}"),
    }  # fmt: skip


def run(quick: bool = False) -> list[dict]:
    """Export a random full-size ViT-B-32 once, then time both runtimes on the same inputs (one row per task)."""
    import onnxruntime as ort
    from corpus import ordinary_captions

    import clipworks
    from clipworks.onnx_export import export_onnx, load_onnx

    torch.manual_seed(0)
    model = clipworks.create_model("ViT-B-32")
    repeats = 2 if quick else 5
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        export = export_onnx(model, Path(tmp) / "onnx")
        export_s = time.perf_counter() - t
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        default, pinned = load_onnx(export.path), load_onnx(export.path, session_options=options)

        for batch in (1, 32):
            images = torch.randn(batch, 3, 224, 224)
            pixels = images.numpy()
            n = max(1, (8 if quick else 32) // batch)
            with torch.inference_mode():
                ref = model.encode_image(images)
                torch_rate = best_rate(lambda x=images, n=n: [model.encode_image(x) for _ in range(n)], batch * n,
                                        repeats)  # fmt: skip
            rates = [best_rate(lambda e=enc, x=pixels, n=n: [e.encode_image(x) for _ in range(n)], batch * n, repeats)
                     for enc in (default, pinned)]  # fmt: skip
            note = f"fp32; max|diff| (normalised) {_max_diff(default.encode_image(pixels), ref):.1e}"
            rows.append(_row(f"image encoding ViT-B-32, batch {batch}", "images/s", torch_rate, *rates, note))

        tokens = clipworks.get_tokenizer("ViT-B-32")(ordinary_captions(256, seed=1))  # (256, 77)
        ids = tokens.numpy()
        longest = int((tokens == 49407).int().argmax(-1).max()) + 1
        with torch.inference_mode():
            ref = model.encode_text(tokens)
            torch_rate = best_rate(lambda: model.encode_text(tokens), 256, repeats)
        rates = [best_rate(lambda e=enc: e.encode_text(ids), 256, repeats) for enc in (default, pinned)]
        note = (f"captions of 5-20 words padded to 77: PyTorch trims to the longest ({longest} tokens), the ONNX "
                f"graph runs all 77 positions; max|diff| (normalised) {_max_diff(default.encode_text(ids), ref):.1e}; "
                f"export of both towers took {export_s:.0f} s")  # fmt: skip
        rows.append(_row("text encoding ViT-B-32, batch 256", "texts/s", torch_rate, *rates, note))
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
