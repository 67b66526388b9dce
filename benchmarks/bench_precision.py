"""Benchmark: CPU inference precisions side by side (issue 22): clipworks fp32 / bf16 / bf16 with prepacked
oneDNN linears / int8 (/ torch.compile with --compile), OpenCLIP fp32 / bf16, ONNX Runtime fp32 / int8 (dynamic
quantisation) on clipworks' ONNX export, and OpenVINO (f32 and bf16 inference precision) where installed.

For each model, image and text encoding rates (median of interleaved rounds, so that a change in the machine's load
hits every variant alike), the fraction of the best bf16 matrix-product rate measured in the same run (torch.matmul
of square bf16 matrices, 1024-3072; clipworks' FLOPs for every variant, counted once by FlopCounterMode), and the
cosine of each variant's embeddings to clipworks' fp32 ones (the minimum over the batch). Random weights, shared by
clipworks and OpenCLIP (copied through clipworks' OpenCLIP key map). Text: full-length 77-token sequences, so
clipworks' padding trim gains nothing (captions shorter than 77 tokens are faster still in clipworks).

Usage:
    python benchmarks/bench_precision.py [--models ViT-B-32 ViT-L-14] [--batch 32] [--text-batch 64]
        [--rounds 3] [--compile] [--no-onnx] [--no-openvino] [--fp32-large] [--threads N] [--cpu-time] [--quick]
--fp32-large also times the fp32 variants of models past ViT-B size (slow: ~15 s per ViT-L-14 batch on 2 cores);
--quick: ViT-B-32 only, batch 8, one round, no ONNX/OpenVINO (a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

FLAGS = ("avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile", "avx512_fp16")
EOT = 49407  # CLIP's end-of-text id, the highest: argmax pooling finds it


def cpu_header() -> str:
    name, flags = platform.processor(), set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"CPU: {name}, {os.cpu_count()} cores; features: {' '.join(f for f in FLAGS if f in flags) or 'none'}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load}")  # fmt: skip


def matmul_peak(sizes=(1024, 2048, 3072), repeats: int = 3) -> dict[int, float]:
    """Best bf16 GFLOP/s of torch.matmul per square size."""
    out = {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        a @ b
        best = min(_seconds(lambda: a @ b) for _ in range(repeats))
        out[n] = 2 * n**3 / best / 1e9
    return out


CLOCK = time.perf_counter  # --cpu-time: time.process_time, the CPU time of the whole process (all its threads)


def _seconds(fn) -> float:
    t = CLOCK()
    fn()
    return CLOCK() - t


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each of `fns`, timed in alternating rounds after one untimed call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_seconds(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def count_flops(fn, batch: int) -> float:
    """FLOPs of `fn()` (one call on a batch of 2), scaled to `batch` (they are linear in the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return counter.get_total_flops() / 2 * batch


def cosine(a, b) -> float:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return float(F.cosine_similarity(a, b, dim=-1).min())


class Variant:
    """One way of encoding: image and text callables on the benchmark's inputs, and its FLOPs per batch."""

    def __init__(self, name, image, text, image_flops, text_flops, slow=False, note=""):
        self.name, self.image, self.text, self.slow, self.note = name, image, text, slow, note
        self.image_flops, self.text_flops = image_flops, text_flops


def build_variants(name: str, args, images, tokens, log) -> tuple:
    import open_clip

    import clipworks
    from clipworks.checkpoints.open_clip import convert_to_open_clip
    from clipworks.models.fast import compile_for_inference, prepack_linears
    from clipworks.models.precision import apply_precision

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m32 = clipworks.create_model(name).eval()
    oc32 = open_clip.create_model(name).eval()
    oc32.load_state_dict(convert_to_open_clip(m32.state_dict(), m32.config))
    ocb = open_clip.create_model(name, precision="bf16").eval()
    ocb.load_state_dict(oc32.state_dict())
    large = m32.visual.config.width > 768

    def clip_variant(label, model, pixels=images, slow=False, note=""):
        return Variant(label, lambda: model.encode_image(pixels), lambda: model.encode_text(tokens), cw_flops[0],
                       cw_flops[1], slow, note)  # fmt: skip

    cw_flops = (count_flops(lambda: m32.encode_image(images[:2]), len(images)),
                count_flops(lambda: m32.encode_text(tokens[:2]), len(tokens)))  # fmt: skip
    # OpenCLIP's own count misses nn.MultiheadAttention's fused inference kernel, so its fraction uses clipworks'
    # count of the same model (OpenCLIP also runs the last block at every position: its true work is ~5% more).
    oc_flops = cw_flops
    bf16 = copy.deepcopy(m32)
    apply_precision(bf16, "bf16")
    packed = copy.deepcopy(bf16)
    prepack_linears(packed)
    int8 = copy.deepcopy(m32)
    apply_precision(int8, "int8")
    variants = [
        clip_variant("clipworks fp32", m32, slow=large),
        clip_variant("clipworks bf16", bf16, note="apply_precision(model, 'bf16')"),
        clip_variant("clipworks bf16 packed", packed, note="+ prepack_linears(model)"),
        clip_variant("clipworks int8", int8, slow=large, note="apply_precision(model, 'int8')"),
    ]
    if args.compile:
        compiled = copy.deepcopy(bf16)
        compile_for_inference(compiled)
        t = time.perf_counter()
        with torch.inference_mode():
            compiled.encode_image(images)
            compiled.encode_text(tokens)
        note = f"compile_for_inference: {time.perf_counter() - t:.0f} s to compile"
        variants.append(clip_variant("clipworks bf16 compiled", compiled, note=note))
    pixels_bf16 = images.bfloat16()
    variants += [
        Variant("OpenCLIP fp32", lambda: oc32.encode_image(images), lambda: oc32.encode_text(tokens), *oc_flops,
                slow=large),  # fmt: skip
        Variant("OpenCLIP bf16", lambda: ocb.encode_image(pixels_bf16), lambda: ocb.encode_text(tokens), *oc_flops,
                note='create_model(precision="bf16")'),  # fmt: skip
    ]
    if not args.no_onnx or not args.no_openvino:
        variants += external_variants(m32, args, images, tokens, cw_flops, large, log)
    return m32, variants


def external_variants(m32, args, images, tokens, cw_flops, large, log) -> list[Variant]:
    """ONNX Runtime (fp32, int8 dynamic) and OpenVINO (f32, bf16) on clipworks' ONNX export. The export (1-3 GB for
    ViT-L-14 with its int8 copy) is deleted once the sessions have read it."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_precision_"))
    try:
        return _external_variants(m32, args, images, tokens, cw_flops, large, log, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _external_variants(m32, args, images, tokens, cw_flops, large, log, tmp: Path) -> list[Variant]:
    from clipworks.onnx_export import export_onnx

    t = time.perf_counter()
    export = export_onnx(m32, tmp / "onnx")
    log(f"  ONNX export of both towers: {time.perf_counter() - t:.0f} s")
    pixels, ids = images.numpy(), tokens.numpy()
    out = []

    def onnx_variant(label, image_run, text_run, slow, note=""):
        return Variant(label, lambda: image_run(pixels), lambda: text_run(ids), *cw_flops, slow=slow, note=note)

    if not args.no_onnx:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        choices = [("ORT fp32", (export.image_path, export.text_path), large)]
        try:
            choices.append(("ORT int8 dynamic", _quantized(export, quantize_dynamic, QuantType), large))
        except Exception as e:  # noqa: BLE001 (a benchmark reports a tool's failure and goes on)
            log(f"  onnxruntime quantize_dynamic failed: {type(e).__name__}: {str(e)[:200]}")
        for label, paths, slow in choices:
            image_s, text_s = (ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                               for p in paths)  # fmt: skip
            out.append(onnx_variant(f"{label} (onnxruntime {ort.__version__})",
                                    lambda x, s=image_s: s.run(None, {"pixel_values": x})[0],
                                    lambda x, s=text_s: s.run(None, {"input_ids": x})[0], slow))  # fmt: skip
    if not args.no_openvino:
        try:
            import openvino as ov
        except ImportError:
            log("  OpenVINO: not installed (pip install openvino)")
            return out
        core = ov.Core()
        for hint, slow in (("f32", large), ("bf16", False)):
            config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": torch.get_num_threads()}
            image_c = core.compile_model(str(export.image_path), "CPU", config)
            text_c = core.compile_model(str(export.text_path), "CPU", config)
            out.append(onnx_variant(f"OpenVINO {hint} ({ov.__version__.split('-')[0]})",
                                    lambda x, c=image_c: c(x)[0], lambda x, c=text_c: c(x)[0], slow))  # fmt: skip
    return out


def _quantized(export, quantize_dynamic, QuantType) -> tuple[Path, Path]:
    """Both graphs through onnxruntime's dynamic int8 quantisation. The exporter's stored intermediate shapes
    (value_info) trip the quantiser's shape inference (a (768) vs (512) mismatch), so they are dropped first."""
    import onnx

    paths = []
    for p in (export.image_path, export.text_path):
        model = onnx.load(str(p))
        del model.graph.value_info[:]
        plain, q = p.with_name(p.stem + "_plain.onnx"), p.with_name(p.stem + "_int8.onnx")
        onnx.save(model, str(plain))
        quantize_dynamic(str(plain), str(q), weight_type=QuantType.QInt8)
        paths.append(q)
    return tuple(paths)


def run_model(name: str, args, log) -> list[dict]:
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, 224, 224)
    tokens = torch.randint(1, EOT, (args.text_batch, 77))
    tokens[:, -1] = EOT  # full length: no padding for clipworks to trim
    log(f"{name}: building variants")
    m32, variants = build_variants(name, args, images, tokens, log)
    large = m32.visual.config.width > 768
    timed = [v for v in variants if not (v.slow and large and not args.fp32_large)]
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    rows = []
    with torch.inference_mode():
        ref = (m32.encode_image(images[:8]), m32.encode_text(tokens[:8]))
        for kind, items in (("image", len(images)), ("text", len(tokens))):
            fns = {v.name: getattr(v, kind) for v in timed}
            fns["bf16 matmul 2048"] = lambda: a @ a
            t = time.perf_counter()
            secs = interleaved(fns, args.rounds)
            log(f"  {kind}: timed in {time.perf_counter() - t:.0f} s, load average {os.getloadavg()[0]:.2f}")
            peak = max(2 * 2048**3 / secs.pop("bf16 matmul 2048") / 1e9, args.peak)
            for v in timed:
                flops = v.image_flops if kind == "image" else v.text_flops
                rows.append({"model": name, "kind": kind, "variant": v.name, "rate": items / secs[v.name],
                             "gflops": flops / secs[v.name] / 1e9, "peak": peak, "note": v.note})  # fmt: skip
        for row in rows:  # cosine on the first 8 images/texts, outside the timing
            v = next(v for v in variants if v.name == row["variant"])
            run = v.image if row["kind"] == "image" else v.text
            row["cosine"] = cosine(run()[:8], ref[0] if row["kind"] == "image" else ref[1])
    return rows


def table(rows: list[dict], peak: float) -> str:
    lines = ["| model | input | variant | rate /s | x OpenCLIP bf16 | fraction of bf16 peak | cosine to fp32 |",
             "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        base = next((r["rate"] for r in rows if r["model"] == row["model"] and r["kind"] == row["kind"]
                     and r["variant"] == "OpenCLIP bf16"), float("nan"))  # fmt: skip
        lines.append(f"| {row['model']} | {row['kind']} | {row['variant']} | {row['rate']:,.1f} | "
                     f"{row['rate'] / base:.2f} | {row['gflops'] / peak:.0%} | {row['cosine']:.5f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time compile_for_inference (bf16)")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--no-openvino", action="store_true")
    parser.add_argument("--fp32-large", action="store_true", help="time fp32/int8 variants of large models too")
    parser.add_argument("--threads", type=int, default=None, help="torch/ONNX Runtime/OpenVINO threads")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by the process's CPU time, not wall time: on a machine shared with other work, "
                             "with --threads 1, it counts only the cycles this process got")  # fmt: skip
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK = time.process_time
    if args.quick:
        args.models, args.batch, args.text_batch, args.rounds = ["ViT-B-32"], 8, 16, 1
        args.no_onnx = args.no_openvino = True

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    print(cpu_header())
    peaks = matmul_peak()
    args.peak = max(peaks.values())
    print("bf16 matmul GFLOP/s: " + ", ".join(f"{n}: {r:,.0f}" for n, r in peaks.items()))
    rows = [row for name in args.models for row in run_model(name, args, log)]
    peak = max(r["peak"] for r in rows)
    print(f"image batch {args.batch}, text batch {args.text_batch} (77 tokens), {args.rounds} interleaved rounds, "
          f"{'CPU' if args.cpu_time else 'wall'} time; "
          f"best bf16 matmul in this run {peak:,.0f} GFLOP/s (the fraction's denominator)")  # fmt: skip
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(table(rows, peak))
    notes = dict.fromkeys(f"- {r['model']} {r['variant']}: {r['note']}" for r in rows if r["note"])
    print("\n".join(notes))


if __name__ == "__main__":
    main()
