"""Core benchmarks: clipworks, OpenCLIP and transformers side by side in one process, with ratios.

Usage: python benchmarks/bench_core.py [--quick] [--only tokenizer,encoding,families,towers,preprocess,onnx] [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = ("tokenizer", "encoding", "families", "towers", "preprocess", "onnx")


def _ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}x" if ours and theirs else "-"


def _rate(x: float | None) -> str:
    return f"{x:,.1f}" if x else "-"


def format_table(rows: list[dict]) -> str:
    lines = [
        "| task | unit | clipworks | open_clip | transformers | vs open_clip | vs transformers |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cw, oc, tf = r["clipworks"], r.get("open_clip"), r.get("transformers")
        lines.append(f"| {r['task']} | {r['unit']} | {_rate(cw)} | {_rate(oc)} | {_rate(tf)} | "
                     f"{_ratio(cw, oc)} | {_ratio(cw, tf)} |")  # fmt: skip
    notes = [f"- {r['task']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and items")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    rows = []
    for part in args.only.split(","):
        if part not in PARTS:
            raise SystemExit(f"unknown part {part!r}; choose from {PARTS}")
        rows += importlib.import_module(f"parts.{part}").run(quick=args.quick)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
