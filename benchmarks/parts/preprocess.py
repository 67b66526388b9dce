"""Preprocessing throughput: JPEG file -> normalised tensor, clipworks against OpenCLIP and transformers."""

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Typical photo sizes; the phone photo is portrait, as it is once its EXIF orientation is applied.
PHOTO_SIZES = ((640, 480), (1024, 768), (1920, 1080), (3024, 4032))


def _write_photos(directory: Path, per_size: int) -> list[Path]:
    """Natural-ish JPEGs (quality 90): smooth colour gradients and blobs under sensor-like noise."""
    rng = np.random.default_rng(0)
    paths = []
    for width, height in PHOTO_SIZES:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        for i in range(per_size):
            fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 6.3, 3)
            base = np.stack(
                [
                    128 + 100 * np.sin(fx * 2 * np.pi * x / width + phase[c]) * np.cos(fy * 2 * np.pi * y / height)
                    for c in range(3)
                ],
                axis=-1,
            )  # (H, W, 3)
            noise = rng.normal(0, 6, (height, width, 1)).astype(np.float32)
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            path = directory / f"photo_{width}x{height}_{i}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            paths.append(path)
    return paths


def _images_per_second(pipelines: dict[str, Callable[[Path], torch.Tensor]], paths: list[Path], repeats: int):
    """Best of `repeats` passes over `paths` for each pipeline, after a warm-up; passes interleaved so
    that load from other processes on the machine hits every pipeline alike."""
    for fn in pipelines.values():
        fn(paths[0])
    best = {name: float("inf") for name in pipelines}
    for _ in range(repeats):
        for name, fn in pipelines.items():
            start = time.perf_counter()
            for path in paths:
                fn(path)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(paths) / seconds for name, seconds in best.items()}


def _max_difference(a: Callable[[Path], torch.Tensor], b: Callable[[Path], torch.Tensor], paths) -> float:
    return max((a(path) - b(path)).abs().max().item() for path in paths)


def _transformers_processors() -> dict[str, Callable[[Path], torch.Tensor]]:
    """Default-constructed CLIP image processors (no download): the default one (a torchvision backend
    in transformers 5) and the PIL one where it exists."""
    try:
        import transformers
    except ImportError:
        return {}
    found = {}
    for label, cls_name in (("transformers", "CLIPImageProcessor"), ("transformers PIL", "CLIPImageProcessorPil")):
        cls = getattr(transformers, cls_name, None)
        if cls is None:
            continue
        try:
            processor = cls()

            def fn(path, processor=processor):
                return processor(images=Image.open(path), return_tensors="pt")["pixel_values"][0]

            found[label] = fn
        except Exception:  # an optional comparison; a broken processor only leaves its column empty
            continue
    return found


def run(quick: bool = False) -> list[dict]:
    import open_clip

    from clipworks.config import PreprocessConfig
    from clipworks.data.decode import load_image
    from clipworks.transforms import image_transform

    cfg = PreprocessConfig()
    exact, fast = image_transform(cfg), image_transform(cfg, fast=True)
    reference = open_clip.image_transform(cfg.image_size, is_train=False)
    pipelines = {
        "clipworks": lambda path: exact.load(path),  # simplejpeg + resample route for JPEGs when verified
        "clipworks fast": lambda path: fast(load_image(path, draft_size=cfg.image_size)),
        "open_clip": lambda path: reference(Image.open(path)),
        **_transformers_processors(),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # single process, single thread: what each DataLoader worker does
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = _write_photos(Path(tmp), per_size=2 if quick else 12)
            rate = _images_per_second(pipelines, paths, repeats=2 if quick else 5)
            identical = all(torch.equal(pipelines["clipworks"](p), pipelines["open_clip"](p)) for p in paths)
            fast_diff = _max_difference(pipelines["clipworks fast"], pipelines["open_clip"], paths)
            tf_diff = None
            if "transformers" in pipelines:
                tf_diff = _max_difference(pipelines["transformers"], pipelines["open_clip"], paths)
    finally:
        torch.set_num_threads(threads)

    sizes = ", ".join(f"{w}x{h}" for w, h in PHOTO_SIZES)
    common = f"{len(paths)} JPEGs (q90; {sizes}), best of {2 if quick else 5} passes, 1 thread"
    tf_note = "" if tf_diff is None else f"; transformers differs from open_clip by up to {tf_diff:.3f}"
    pil_note = ""
    if "transformers PIL" in rate:
        pil_note = f"; transformers CLIPImageProcessorPil {rate['transformers PIL']:.1f} images/s"
    return [
        {
            "task": "preprocess JPEG -> tensor",
            "unit": "images/s",
            "clipworks": rate["clipworks"],
            "open_clip": rate["open_clip"],
            "transformers": rate.get("transformers"),
            "note": f"{common}; clipworks EvalTransform.load (JPEG: simplejpeg + integer-GEMM resampling), "
            f"{'bit-identical to' if identical else 'DIFFERENT from'} open_clip on every file; "
            f"{rate['clipworks'] / rate['open_clip']:.2f}x open_clip{tf_note}{pil_note}",
        },
        {
            "task": "preprocess JPEG -> tensor, clipworks fast mode",
            "unit": "images/s",
            "clipworks": rate["clipworks fast"],
            "open_clip": rate["open_clip"],
            "transformers": rate.get("transformers"),
            "note": f"{common}; opt-in load_image(draft_size=224) + image_transform(fast=True): "
            f"{rate['clipworks fast'] / rate['open_clip']:.2f}x open_clip, NOT bit-identical "
            f"(up to {fast_diff:.3f} from open_clip after normalisation)",
        },
    ]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
