"""GPU embedding throughput: `clipworks embed` (bf16 weights, GPU-sized batches, pinned copies overlapping compute;
JPEGs decoded by CPU workers, or on the GPU with `gpu_decode`, optionally `torch.compile` with CUDA graphs)
against OpenCLIP's usual loop (DataLoader workers decoding with Pillow + `encode_image` under autocast), on
generated 256-pixel JPEGs in WebDataset shards (img2dataset's layout) and on full-size photos.

Per model, source and route it prints images/s, the GPU's utilisation (sampled during the run), the share of
the wall time the GPU waited for input (1 - EmbedResult.stats.busy_fraction; for OpenCLIP's loop the time its
loop waited for the loader), the encoder alone on pre-decoded tensors, and the GPU-decode route's cosine to
the exact CPU route. Targets (issue 22): ViT-B-32 >= 8,000 images/s on one H100/H200 on the 256-pixel shards,
and >= 5x OpenCLIP's loop. Random weights (the machine reaches no network): speed does not depend on them.

The GPU run (one command, ~5-8 minutes on an H100/H200 with 16 cores):
    python benchmarks/bench_embed_gpu.py --device cuda
    python benchmarks/bench_embed_gpu.py --device cuda --models ViT-B-32 --compile   # also the compiled route
CPU smoke test (checks that everything runs; its figures say nothing about a GPU):
    python benchmarks/bench_embed_gpu.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = ("ViT-B-32", "ViT-L-14", "ViT-B-16-SigLIP")


class _Utilisation:
    """Samples the GPU's utilisation (percent of time a kernel ran) every 50 ms while in a `with` block:
    `torch.cuda.utilization()` (pynvml), else `nvidia-smi`; None on a CPU or where neither answers."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self.stop = device, [], threading.Event()

    def _sample(self) -> float | None:
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:  # no pynvml: ask nvidia-smi
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      f"--id={self.device.index or 0}"], capture_output=True, text=True, timeout=2)
                return float(out.stdout.strip().splitlines()[0])
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return None

    def _loop(self):
        while not self.stop.wait(0.05):
            value = self._sample()
            if value is not None:
                self.samples.append(value)

    def __enter__(self):
        if self.device.type == "cuda":
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.device.type == "cuda":
            self.thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


# --- OpenCLIP's usual loop ---------------------------------------------------------------------------------------


from bench_search import _OpenCLIPFiles as _Files  # noqa: E402 (what a plain OpenCLIP script does)


class _Tars(torch.utils.data.IterableDataset):
    """Each worker reads its share of the tars and yields the preprocessed .jpg of every sample."""

    def __init__(self, tars, preprocess):
        self.tars, self.preprocess = tars, preprocess

    def __iter__(self):
        import io

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for tar in self.tars[worker::workers]:
            with tarfile.open(tar) as t:
                for member in t:
                    if member.name.endswith(".jpg"):
                        with Image.open(io.BytesIO(t.extractfile(member).read())) as image:
                            yield self.preprocess(image)


def open_clip_loop(model, preprocess, source, batch_size: int, workers: int, device) -> tuple[int, float]:
    """(images, seconds the loop waited for the loader): DataLoader + encode_image under bf16 autocast."""
    kind, path = source
    dataset = _Files(path, preprocess) if kind == "files" else _Tars(path, preprocess)
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=cuda,
                                         persistent_workers=False)  # fmt: skip
    n, waited, feats = 0, 0.0, []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        it = iter(loader)
        while True:
            start = time.perf_counter()
            images = next(it, None)
            waited += time.perf_counter() - start
            if images is None:
                break
            features = model.encode_image(images.to(device, non_blocking=cuda))
            feats.append(torch.nn.functional.normalize(features, dim=-1).float().cpu())
            n += len(images)
    return n, waited


# --- the runs -----------------------------------------------------------------------------------------------


def _models(name: str, device: torch.device):
    """OpenCLIP's and clipworks' `name`, random weights; clipworks' cast to bf16 by `apply_precision`."""
    import open_clip

    import clipworks

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        oc, _, oc_pre = open_clip.create_model_and_transforms(name)
        cw, _, cw_pre = clipworks.create_model_and_transforms(name)
    cw = cw.to(device).eval()
    try:
        from clipworks.models.precision import apply_precision

        apply_precision(cw, "bf16", device.type)
    except ImportError:
        cw = cw.to(torch.bfloat16)
    return oc.to(device).eval(), oc_pre, cw, cw_pre


def _encoder_rate(model, size: int, batch_size: int, device: torch.device) -> float:
    """Images/s of the image tower alone on pre-decoded tensors already on the device."""
    from clipworks.search.embed import input_dtype

    x = torch.randn(batch_size, 3, size, size, device=device).to(input_dtype(model))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(2):
            model.encode_image(x, normalize=True)
        sync()
        rounds = 10 if device.type == "cuda" else 2
        start = time.perf_counter()
        for _ in range(rounds):
            model.encode_image(x, normalize=True)
        sync()
    return rounds * batch_size / (time.perf_counter() - start)


def _sources(tmp: Path, shard_images: int, photos: int, size: int) -> dict:
    """source name -> ((embed's spec, OpenCLIP loop's input), the same for a small warm-up copy)."""
    from bench_search import write_wds_shards
    from parts.preprocess import PHOTO_SIZES, _write_photos

    def wds(name, n):
        spec = write_wds_shards(tmp / name, n, shards=max(2, n // 400), side=size)  # 4 per worker of 15
        return spec, ("tars", sorted(str(p) for p in (tmp / name).glob("*.tar")))

    def folder(name, distinct, n):
        (tmp / name).mkdir()
        for k in range(max(0, n // len(distinct))):
            for p in distinct:
                shutil.copy(p, tmp / name / f"copy{k}_{p.name}")
        return f"folder:{tmp / name}", ("files", sorted((tmp / name).glob("*.jpg")))

    (tmp / "distinct").mkdir()
    distinct = _write_photos(tmp / "distinct", max(1, min(8, photos // len(PHOTO_SIZES))))
    return {f"wds {size}px": (wds("wds", shard_images), wds("wds-warm", 512)),
            "photos": (folder("photos", distinct, photos), folder("photos-warm", distinct, len(distinct)))}


def _cosine(a_dir: Path, b_dir: Path) -> tuple[float, float]:
    from clipworks.search.store import read_embeddings

    a, ra, _ = read_embeddings(a_dir)
    b, rb, _ = read_embeddings(b_dir)
    by_key = {r["key"]: v for r, v in zip(rb, b.astype(np.float32))}
    c = np.array([float(v.astype(np.float32) @ by_key[r["key"]]) for r, v in zip(ra, a)])
    return float(c.min()), float(c.mean())


def bench(models, device, shard_images, photos, batch_size, workers, compile_too) -> list[dict]:
    from clipworks.search.embed import embed_collection

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = _sources(tmp, shard_images, photos, 256)
        for name in models:
            oc, oc_pre, cw, cw_pre = _models(name, device)
            size = cw.preprocess_config.image_size
            encoder = _encoder_rate(cw, size, batch_size, device)
            routes = {"clipworks embed": {}, "clipworks embed --gpu-decode": {"gpu_decode": True}}
            if compile_too:
                routes["clipworks embed --gpu-decode --compile"] = {"gpu_decode": True, "compile": True}
            for source, ((spec, oc_source), (warm_spec, warm_oc)) in sources.items():
                open_clip_loop(oc, oc_pre, warm_oc, batch_size, workers, device)  # warm-up: cuDNN, allocator
                with _Utilisation(device) as util:
                    start = time.perf_counter()
                    n, waited = open_clip_loop(oc, oc_pre, oc_source, batch_size, workers, device)
                    seconds = time.perf_counter() - start
                oc_rate = n / seconds
                rows.append(_row(name, source, "OpenCLIP loop (bf16 autocast)", oc_rate, util.mean, waited / seconds,
                                 encoder, oc_rate, None))  # fmt: skip
                for route, options in routes.items():
                    out = tmp / f"out-{len(rows)}"
                    run = lambda d, o: embed_collection(cw, d, o, model_name=name, transform=cw_pre,  # noqa: E731
                                                        batch_size=batch_size, workers=workers, progress=False,
                                                        **options)  # fmt: skip
                    run(warm_spec, tmp / "warm")  # cuDNN, allocator, compilation (each batch size)
                    shutil.rmtree(tmp / "warm")
                    with _Utilisation(device) as util:
                        result = run(spec, out)
                    cos = _cosine(out, tmp / f"out-{len(rows) - 1}") if "gpu" in route else None
                    rows.append(_row(name, source, route, result.embedded / result.seconds, util.mean,
                                     1 - result.stats.busy_fraction, encoder, oc_rate, cos))  # fmt: skip
            del oc, cw
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _row(model, source, route, rate, util, waited, encoder, oc_rate, cos) -> dict:
    return {"model": model, "source": source, "route": route, "images_per_s": rate, "gpu_util": util,
            "waited": waited, "encoder": encoder, "vs_open_clip": rate / oc_rate, "cosine_to_exact": cos}


def format_rows(rows: list[dict], setting: str) -> str:
    lines = ["| model | source | route | images/s | vs OpenCLIP loop | GPU util | GPU waited for input | encoder alone | "
             "cosine to exact route (min / mean) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        util = "-" if r["gpu_util"] is None else f"{r['gpu_util']:.0f}%"
        cos = "-" if r["cosine_to_exact"] is None else "{:.5f} / {:.5f}".format(*r["cosine_to_exact"])
        lines.append(f"| {r['model']} | {r['source']} | {r['route']} | {r['images_per_s']:,.0f} | "
                     f"{r['vs_open_clip']:.2f}x | {util} | {r['waited']:.0%} | {r['encoder']:,.0f} | {cos} |")
    return "\n".join(lines + ["", f"- {setting}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--shard-images", type=int, default=24_000, help="256-pixel JPEGs in the WebDataset shards")
    parser.add_argument("--photos", type=int, default=768, help="full-size photos (0.3-12 megapixels)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: embed's default for the device")
    parser.add_argument("--workers", type=int, default=None, help="default: one per core but one")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile (CUDA graphs) route")
    parser.add_argument("--quick", action="store_true", help="a smoke test: ViT-B-32, few images")
    args = parser.parse_args()
    from clipworks.search.embed import default_batch_size, default_workers

    device = torch.device(args.device)
    models = ["ViT-B-32"] if args.quick and args.models == ",".join(MODELS) else args.models.split(",")
    shard_images, photos = (96, 16) if args.quick else (args.shard_images, args.photos)
    batch_size = args.batch_size or (32 if args.quick and device.type == "cpu" else default_batch_size(device))
    workers = default_workers(device) if args.workers is None else args.workers
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# torch {torch.__version__}, {where}, {os.cpu_count()} CPU cores, batch {batch_size}, {workers} workers",
          flush=True)  # fmt: skip
    rows = bench(models, device, shard_images, photos, batch_size, workers, args.compile)
    setting = (f"{where}; {shard_images} 256-pixel JPEGs (q95) in WebDataset shards, {photos} photos (640x480 to "
               f"3024x4032, q90); batch {batch_size}, {workers} DataLoader workers; clipworks in bf16 "
               "(apply_precision), OpenCLIP fp32 weights under bf16 autocast; random weights; uptime "
               + " ".join(f"{x:.2f}" for x in os.getloadavg()))  # fmt: skip
    print(format_rows(rows, setting))
    if device.type != "cuda":
        print("\nCPU smoke run: these figures say nothing about a GPU. The GPU figures (targets: ViT-B-32 >= 8,000 "
              "images/s on the 256-pixel shards on one H100/H200, >= 5x OpenCLIP's loop) need a GPU: "
              "python benchmarks/bench_embed_gpu.py --device cuda")  # fmt: skip


if __name__ == "__main__":
    main()
