"""Search benchmarks: (a) embedding throughput, JPEG files to stored embeddings, clipworks embed against a plain
OpenCLIP loop on the same files and weights; (b) index query latency and recall@10 at up to a million vectors;
(c) whether the embed pipeline keeps its model busy on the CPU: images/s, the model's busy share of the wall
time and the throughput against the encoder alone on pre-decoded tensors, per precision (fp32, bf16), source
(the photos of (a); 256-pixel JPEGs in WebDataset shards as img2dataset writes them) and split of the cores
(workers that encode their own batches, or one encoder with 1 or 2 threads beside decoding workers).

Usage:
    python benchmarks/bench_search.py [--only embed,index,pipeline] [--images 256] [--batch-size 32] [--workers 2]
                                      [--vectors 1000000] [--queries 1000] [--kinds flat,ivf] [--json OUT]
    python benchmarks/bench_search.py --only pipeline          # (c) alone, ~2-3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))


# --- (a) embedding throughput ---------------------------------------------------------------------------------

# Distinct photos drawn per size (drawing a 12-megapixel one takes ~0.5 s); larger runs copy them.
DISTINCT_PER_SIZE = 16


class _OpenCLIPFiles(torch.utils.data.Dataset):
    """What a plain OpenCLIP script does: open each file with Pillow and apply open_clip's preprocess (which
    converts to RGB itself, after resizing: an explicit `.convert("RGB")` first would cost it a full-size copy)."""

    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            return self.preprocess(image)


def _open_clip_loop(model, preprocess, paths, out: Path, batch_size: int, workers: int, device) -> np.ndarray:
    """The baseline: DataLoader + encode_image, features normalised and saved as float16 with their keys."""
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(_OpenCLIPFiles(paths, preprocess), batch_size=batch_size,
                                         num_workers=workers, pin_memory=cuda)  # fmt: skip
    feats = []
    with torch.no_grad():
        for images in loader:
            features = model.encode_image(images.to(device, non_blocking=cuda))
            feats.append(torch.nn.functional.normalize(features, dim=-1).float().cpu().numpy())
    x = np.concatenate(feats)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "emb.npy", x.astype(np.float16))
    (out / "keys.txt").write_text("\n".join(p.name for p in paths))
    return x


def _models(device):
    """OpenCLIP ViT-B-32 with random weights, and clipworks' ViT-B-32 holding the very same weights."""
    import open_clip

    import clipworks
    from clipworks.checkpoints.open_clip import convert_from_open_clip

    torch.manual_seed(0)
    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms("ViT-B-32")  # no pretrained: random init
    oc_model.eval()
    cw_model, _, cw_preprocess = clipworks.create_model_and_transforms("ViT-B-32")
    cw_model.load_state_dict(convert_from_open_clip(oc_model.state_dict(), cw_model.config))
    return oc_model.to(device), oc_preprocess, cw_model.to(device), cw_preprocess


def _stage_costs(paths, oc_model, oc_preprocess, cw_model, cw_preprocess, batch_size: int) -> dict:
    """CPU milliseconds per image of each stage on one thread (best of 3): what throughput is made of when
    decoding and encoding share the cores. Encoding is timed only for models on the CPU (NaN otherwise)."""
    from clipworks.data.decode import load_image
    from clipworks.transforms import image_transform

    fast = image_transform(cw_model.preprocess_config, fast=True)
    size = cw_model.preprocess_config.image_size
    sides = {
        "open_clip": (lambda p: oc_preprocess(Image.open(p)), oc_model),
        "clipworks": (lambda p: cw_preprocess.load(p), cw_model),
        "clipworks --fast-decode": (lambda p: fast(load_image(p, draft_size=size)), cw_model),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    batch = torch.stack([cw_preprocess(load_image(p)) for p in paths[:batch_size]])  # (B, 3, S, S)
    costs = {}
    try:
        for name, (decode, model) in sides.items():
            cpu = next(model.parameters()).device.type == "cpu"
            costs[name] = (_cpu_ms(lambda: [decode(p) for p in paths], len(paths)),
                           _cpu_ms(lambda: model.encode_image(batch), len(batch)) if cpu else float("nan"))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return costs


def _device_name(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({os.cpu_count()} CPU cores)"
    return f"CPU ({os.cpu_count()} cores)"


def _cpu_ms(fn, items: int, repeats: int = 3) -> float:
    from timing import best_rate

    with torch.inference_mode():
        return 1000 / best_rate(fn, items, repeats, clock=time.process_time)


def bench_embed(images: int, batch_size: int, workers: int, repeats: int, device: str = "cpu") -> list[dict]:
    """Images per second from JPEG files to embeddings on disk, best of `repeats` interleaved runs."""
    from parts.preprocess import PHOTO_SIZES, _write_photos

    from clipworks.models.quant import quantize_int8
    from clipworks.search.embed import embed_collection
    from clipworks.search.store import read_embeddings

    device = torch.device(device)
    oc_model, oc_preprocess, cw_model, cw_preprocess = _models(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "photos").mkdir()
        per_size = max(1, images // len(PHOTO_SIZES))
        distinct = sorted(_write_photos(tmp / "photos", min(per_size, DISTINCT_PER_SIZE)))
        paths = list(distinct)
        for k in range(per_size // DISTINCT_PER_SIZE - 1):  # whole copies of the distinct photos make up the rest
            paths += [shutil.copy(path, path.with_name(f"copy{k}_{path.name}")) for path in distinct]
        paths = sorted(Path(p) for p in paths)
        runs = {
            "open_clip": lambda: _open_clip_loop(oc_model, oc_preprocess, paths, tmp / "oc", batch_size, workers, device),
            "clipworks": lambda: embed_collection(cw_model, f"folder:{tmp / 'photos'}", tmp / "cw", model_name="ViT-B-32",
                                                  transform=cw_preprocess, batch_size=batch_size, workers=workers,
                                                  progress=False),  # fmt: skip
            "clipworks fast": lambda: embed_collection(cw_model, f"folder:{tmp / 'photos'}", tmp / "cwf",
                                                       model_name="ViT-B-32", transform=cw_preprocess,
                                                       batch_size=batch_size, workers=workers, fast_decode=True,
                                                       progress=False),  # fmt: skip
        }
        if device.type == "cpu":  # int8 products are a CPU option
            int8 = quantize_int8(copy.deepcopy(cw_model))
            runs["clipworks int8"] = lambda: embed_collection(int8, f"folder:{tmp / 'photos'}", tmp / "cwq",
                                                              model_name="ViT-B-32", transform=cw_preprocess,
                                                              batch_size=batch_size, workers=workers,
                                                              progress=False)  # fmt: skip
        best = {name: float("inf") for name in runs}
        for _ in range(repeats):
            for (name, run), folder in zip(runs.items(), ("oc", "cw", "cwf", "cwq")):
                shutil.rmtree(tmp / folder, ignore_errors=True)
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        costs = _stage_costs(distinct, oc_model, oc_preprocess, cw_model, cw_preprocess, batch_size)
        reference = _open_clip_loop(oc_model, oc_preprocess, paths, tmp / "oc", batch_size, workers, device)
        exact = read_embeddings(tmp / "cw")[0]
        fast = read_embeddings(tmp / "cwf")[0]
        quantised = read_embeddings(tmp / "cwq")[0] if "clipworks int8" in runs else None
    rate = {name: len(paths) / s for name, s in best.items()}
    sizes = ", ".join(f"{w}x{h}" for w, h in PHOTO_SIZES)
    setting = (f"{len(paths)} JPEGs (q90; {sizes}), batch {batch_size}, {workers} workers, best of {repeats}, "
               f"{_device_name(device)}, fp32")  # fmt: skip
    for name, (decode, encode) in costs.items():
        rows.append({"task": f"CPU time per image, {name}", "unit": "ms", "clipworks": None, "open_clip": None,
                     "note": f"decode+preprocess {decode:.1f} ms, encode_image {encode:.1f} ms (one thread, "
                             f"batch {batch_size}, process time: robust to other load on the machine)"})  # fmt: skip
    for part, pick in (("decode+preprocess", lambda c: c[0]), ("decode+preprocess+encode", sum)):
        total = {name: pick(c) for name, c in costs.items()}
        if math.isnan(total["open_clip"]):
            continue
        rows.append({"task": f"CPU time ratio, {part}", "unit": "x", "clipworks": None, "open_clip": None,
                     "note": f"open_clip / clipworks {total['open_clip'] / total['clipworks']:.2f}x; open_clip / "
                             f"clipworks --fast-decode {total['open_clip'] / total['clipworks --fast-decode']:.2f}x"})
    rows.append({"task": "embed JPEG files -> stored embeddings, ViT-B-32", "unit": "images/s",
                 "clipworks": rate["clipworks"], "open_clip": rate["open_clip"],
                 "note": f"{setting}; bit-identical preprocessing; max|diff| of stored fp16 embeddings vs open_clip "
                         f"{np.abs(exact - reference.astype(np.float16)).max():.1e}"})  # fmt: skip
    cos = float((fast * exact).sum(1).min())
    rows.append({"task": "embed, clipworks --fast-decode (opt-in)", "unit": "images/s",
                 "clipworks": rate["clipworks fast"], "open_clip": rate["open_clip"],
                 "note": f"{setting}; reduced-size JPEG decode + one-step resize: NOT bit-identical, lowest cosine "
                         f"to the exact embeddings {cos:.4f}"})  # fmt: skip
    if quantised is not None:
        cos = float((quantised.astype(np.float32) * exact).sum(1).min())
        rows.append({"task": "embed, clipworks --int8 (opt-in, CPU)", "unit": "images/s",
                     "clipworks": rate["clipworks int8"], "open_clip": rate["open_clip"],
                     "note": f"{setting.replace('fp32', 'int8 products in the blocks')}; exact preprocessing; NOT the "
                             f"fp32 model's outputs: lowest cosine to the exact embeddings {cos:.4f} (random "
                             "weights: trained ones have larger activation outliers)"})  # fmt: skip
    return rows


# --- (c) the embed pipeline on the CPU ----------------------------------------------------------------------


def write_wds_shards(folder: Path, images: int, shards: int, side: int = 256, seed: int = 0) -> str:
    """`images` photo-like side x side JPEGs (quality 95) in `shards` tars laid out as img2dataset writes them
    (NNNNN.jpg, .txt and .json per sample); returns the `wds:` spec."""
    import io
    import tarfile

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    per = math.ceil(images / shards)
    for t in range(shards):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for i in range(t * per, min(images, (t + 1) * per)):
                f, phase = rng.uniform(1, 6, 2), rng.uniform(0, 6.3, 3)
                base = np.stack([128 + 100 * np.sin(f[0] * 6.3 * x / side + phase[c]) * np.cos(f[1] * 6.3 * y / side)
                                 for c in range(3)], axis=-1)  # fmt: skip
                pixels = np.clip(base + rng.normal(0, 6, (side, side, 1)), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
                meta = {"url": f"https://example.com/{i}.jpg", "width": side, "height": side, "key": f"{i:09d}"}
                for ext, data in (("jpg", buffer.getvalue()), ("txt", f"a photo {i}".encode()),
                                  ("json", json.dumps(meta).encode())):  # fmt: skip
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"wds:{folder}/{{00000..{shards - 1:05d}}}.tar"


def cast(model, precision: str):
    """`model` (a copy) in `precision`: clipworks' `apply_precision` where it exists (bf16: with its linears and patch
    embedding prepacked, as the CLI's commands run it), else a plain cast."""
    model = copy.deepcopy(model)
    if precision == "fp32":
        return model
    try:
        from clipworks.models.precision import apply_precision
    except ImportError:
        return model.to(torch.bfloat16)
    apply_precision(model, precision, "cpu")
    if precision == "bf16":  # as `clipworks embed --precision bf16` prepares it (prepare_for_inference)
        from clipworks.models.fast import packed_linears_available, prepack_linears

        if packed_linears_available():
            prepack_linears(model)
    return model


def _encoder_rate(model, batch_size: int, repeats: int) -> float:
    """Images/s of `encode_image` alone on pre-decoded tensors, this process's threads, the pipeline's batch."""
    from timing import best_rate

    from clipworks.search.embed import input_dtype

    x = torch.randn(batch_size, 3, 224, 224).to(input_dtype(model))
    with torch.inference_mode():
        return best_rate(lambda: model.encode_image(x, normalize=True), batch_size, repeats)


def bench_pipeline(images: int, photos: int, batch_size: int, workers: int, repeats: int,
                   precisions: list[str]) -> list[dict]:  # fmt: skip
    """The embed pipeline against its encoder on this CPU, per precision, source and split of the cores:
    `images` 256-pixel JPEGs in WebDataset shards, `photos` full-size photos (0 leaves a source out)."""
    from parts.preprocess import _write_photos

    from clipworks.search.embed import embed_collection

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _, _, base, preprocess = _models(torch.device("cpu"))
    rows, threads = [], torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {}
        if photos:
            (tmp / "photos").mkdir()
            distinct = _write_photos(tmp / "photos", min(4, max(1, photos // 4)))  # copies make up the rest
            for k in range(max(0, photos // len(distinct) - 1)):
                [shutil.copy(p, p.with_name(f"copy{k}_{p.name}")) for p in distinct]
            sources["photos"] = f"folder:{tmp / 'photos'}"
        if images:
            sources["wds 256px"] = write_wds_shards(tmp / "wds", images, shards=2 * workers)
        splits = {f"{workers} workers encode, 1 thread each": ("workers", 1, False)}
        splits.update({f"1 encoder x {t} threads + {workers} decoders": ("main", t, False) for t in sorted({1, cores})})
        fast = {f"{workers} workers encode, 1 thread each, --fast-decode": ("workers", 1, True)}  # photos only
        for precision in precisions:
            model = cast(base, precision)
            for source, data in sources.items():
                best: dict = {}
                encoder = encoder_1 = 0.0
                for _ in range(repeats):  # interleaved: a change of load hits the encoder and every split alike
                    torch.set_num_threads(cores)
                    encoder = max(encoder, _encoder_rate(model, batch_size, 2))
                    torch.set_num_threads(1)
                    encoder_1 = max(encoder_1, _encoder_rate(model, batch_size, 2))
                    for name, (where, t, fast_decode) in (splits | (fast if source == "photos" else {})).items():
                        torch.set_num_threads(t)
                        shutil.rmtree(tmp / "out", ignore_errors=True)
                        start = time.perf_counter()
                        r = embed_collection(model, data, tmp / "out", model_name="ViT-B-32", transform=preprocess,
                                             batch_size=batch_size, workers=workers, encode_in=where, progress=False,
                                             fast_decode=fast_decode)  # fmt: skip
                        seconds = time.perf_counter() - start
                        if name not in best or seconds < best[name][0]:
                            best[name] = (seconds, r.embedded, r.stats)
                torch.set_num_threads(threads)
                own = max(encoder, cores * encoder_1)  # the encoder's best: one process, or one per core
                for name, (seconds, n, stats) in best.items():
                    rate = n / seconds
                    rows.append({"precision": precision, "source": source, "split": name, "images_per_s": rate,
                                 "busy": stats.busy_fraction, "wait": stats.wait_seconds / stats.wall_seconds,
                                 "vs_encoder": rate / own, "encoder": encoder, "encoder_1thread": encoder_1,
                                 "images": n})  # fmt: skip
                shutil.rmtree(tmp / "out", ignore_errors=True)
    torch.set_num_threads(threads)
    return rows


def format_pipeline(rows: list[dict], batch_size: int) -> str:
    lines = [f"| precision | source | split of the cores | images/s | model busy | main waits | vs encoder alone |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['precision']} | {r['source']} | {r['split']} | {r['images_per_s']:.1f} | {r['busy']:.0%} | "
              f"{r['wait']:.0%} | {r['vs_encoder']:.2f}x |" for r in rows]  # fmt: skip
    enc = {(r["precision"], r["source"]): (r["encoder"], r["encoder_1thread"]) for r in rows}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines += ["", f"- encoder alone (ViT-B-32 encode_image on pre-decoded tensors, batch {batch_size}, timed between "
              f"the pipeline runs; 'vs encoder alone' divides by the better of one process on all {cores} cores and "
              f"{cores} x one thread): " + "; ".join(f"{p} (beside {s}) {a:.1f} images/s on all cores, {b:.1f} on one "
                                                  "thread" for (p, s), (a, b) in enc.items()),  # fmt: skip
              "- model busy: the time inside encode calls over the wall time, per encoding process "
              "(EmbedResult.stats.busy_fraction); main waits: the share of the wall time this process waited for "
              "the loader's next batch (includes the workers' start); photos: 640x480 to 3024x4032 JPEGs, exact "
              "decoding (--fast-decode: reduced-size JPEG decoding, cosine to exact >= 0.9999); wds 256px: img2dataset's layout (4 tars); images per run: "
              + ", ".join(sorted({f"{r['source']} {r['images']}" for r in rows})) + f"; uptime: {_load()}"]  # fmt: skip
    return "\n".join(lines)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "-"


# --- (b) index latency and recall ---------------------------------------------------------------------------


def clustered_vectors(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around `clusters` random centres that share a common direction, each cluster with its own
    spread (Gaussian noise 0.5x to 2x the centre's scale): clumped and anisotropic like real embeddings, unlike
    uniform noise on the sphere, where every neighbour is about as far as any other."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(d).astype(np.float32)  # a common direction, as CLIP embeddings have
    centres = shared + rng.standard_normal((clusters, d)).astype(np.float32)
    spread = rng.uniform(0.5, 2.0, clusters).astype(np.float32)  # tight and loose clusters
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        c = rng.integers(0, clusters, m)
        x = centres[c] + spread[c, None] * rng.standard_normal((m, d), dtype=np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def bench_index(vectors: int, queries: int, kinds: list[str], dim: int = 512) -> list[dict]:
    """p50/p99 single-query latency (k=10) and recall@10 against exact search on held-out queries."""
    from clipworks.search import ann
    from clipworks.search.index import build_index
    from clipworks.search.store import write_embeddings

    data = clustered_vectors(vectors + queries, dim, clusters=max(10, vectors // 1000), seed=0)
    base, q = data[:vectors], data[vectors:]
    exact = ann.exact_neighbours(base, q, 10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        records = [{"key": f"v{i}"} for i in range(vectors)]
        write_embeddings(Path(tmp) / "emb", base, records, model="synthetic", dtype="float32")
        del records
        for kind in kinds:
            start = time.perf_counter()
            index = build_index(Path(tmp) / "emb", Path(tmp) / kind, kind=kind)
            build = time.perf_counter() - start
            times, found = [], []
            for i in range(len(q)):
                t = time.perf_counter()
                hits = index.search(q[i : i + 1], 10)[0]
                times.append(time.perf_counter() - t)
                found.append([int(h.key[1:]) for h in hits])
            recall = ann.recall_at_k(np.array(found), exact, np.full(len(q), -1), 10)
            m = index.manifest
            knob = f"{m['search_param_name']}={m['search_param']}, " if m["search_param_name"] else ""
            rows.append({"kind": kind, "vectors": vectors, "p50_ms": 1000 * float(np.percentile(times, 50)),
                         "p99_ms": 1000 * float(np.percentile(times, 99)), "recall_at_10": recall,
                         "build_recall_at_10": m["recall_at_10"], "build_s": build,
                         "index_mb": m["index_bytes"] / 2**20, "note": f"{knob}params {m['params']}"})  # fmt: skip
            del index
            shutil.rmtree(Path(tmp) / kind)
    return rows


def _faiss_threads() -> int:
    from clipworks.search.ann import import_faiss

    return import_faiss().omp_get_max_threads()


def format_tables(embed_rows: list[dict], index_rows: list[dict], setting: str) -> str:
    lines = []
    if embed_rows:
        lines += ["| task | unit | clipworks | open_clip | vs open_clip |", "|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['unit']} | {r['clipworks']:,.1f} | {r['open_clip']:,.1f} | "
                  f"{r['clipworks'] / r['open_clip']:.2f}x |" for r in embed_rows if r["clipworks"]]  # fmt: skip
        lines += [""] + [f"- {r['task']}: {r['note']}" for r in embed_rows] + [""]
    if index_rows:
        lines += ["| index | vectors | p50 ms | p99 ms | recall@10 (held-out queries) | recall@10 (build) | build s | "
                  "index MB |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['kind']} | {r['vectors']:,} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['recall_at_10']:.4f} | "
                  f"{r['build_recall_at_10']:.4f} | {r['build_s']:.1f} | {r['index_mb']:,.0f} |" for r in index_rows]  # fmt: skip
        lines += [""] + [f"- {r['kind']}: {r['note']}" for r in index_rows]
        lines += [f"- {setting}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="embed,index", help="comma-separated parts: embed, index")
    parser.add_argument("--images", type=int, default=256,
                        help="JPEG files: four photo sizes, 16 distinct photos each, copied beyond 64")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, the same for both sides")
    parser.add_argument("--repeats", type=int, default=2, help="embedding runs per side (best is reported)")
    parser.add_argument("--vectors", type=int, default=1_000_000, help="vectors in the index benchmark")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries for latency and recall")
    parser.add_argument("--kinds", default="flat,ivf", help="index kinds to measure (flat, ivf, ivfpq, hnsw, auto)")
    parser.add_argument("--device", default="cpu", help="where both sides encode (cpu, cuda)")
    parser.add_argument("--precisions", default="fp32,bf16", help="(c): precisions of the pipeline benchmark")
    parser.add_argument("--pipeline-images", type=int, default=512, help="(c): 256-pixel JPEGs per run (0: none)")
    parser.add_argument("--pipeline-photos", type=int, default=128, help="(c): full-size photos per run (0: none)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}", flush=True)
    embed_rows = bench_embed(args.images, args.batch_size, args.workers, args.repeats, args.device) if "embed" in parts else []
    index_rows = bench_index(args.vectors, args.queries, args.kinds.split(",")) if "index" in parts else []
    setting = (f"index: {args.vectors:,} unit vectors of 512 dims drawn around {max(10, args.vectors // 1000):,} "
               "random centres with a shared direction and spreads of 0.5x-2x (clustered, not uniform noise: see "
               f"clustered_vectors); {args.queries} held-out queries from the same distribution, one at a time, "
               f"k=10; recall against exact inner-product search; faiss {_faiss_threads() if index_rows else '-'} "
               "OpenMP threads (one per single query, see SearchIndex.search)")  # fmt: skip
    print(format_tables(embed_rows, index_rows, setting))
    pipeline_rows = []
    if "pipeline" in parts:
        pipeline_rows = bench_pipeline(args.pipeline_images, args.pipeline_photos, args.batch_size, args.workers,
                                       args.repeats, args.precisions.split(","))  # fmt: skip
        print(format_pipeline(pipeline_rows, args.batch_size))
    if args.json:
        Path(args.json).write_text(json.dumps({"embed": embed_rows, "index": index_rows, "pipeline": pipeline_rows},
                                              indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
