"""The benchmark suite's reports: results.csv (CLIP_benchmark's `build` columns), results.md (OpenCLIP's results
table: a row per model, a column per dataset, the average first) and a plot per collection (the `plots` extra)."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..train.plot import load_matplotlib, new_figure, save_figure
from .suite_tasks import AVERAGED, CAPTIONING, SCORE_HELP, main_score

FIRST, LAST = ("dataset", "model", "pretrained", "task"), ("language", "model_fullname", "precision")
MARKERS = "oDs^vP*X<>"


def full_name(record: dict) -> str:
    """CLIP_benchmark's model_fullname: "model pretrained"."""
    return f"{record['model']} {record['pretrained']}"


def write_results_csv(path: str | os.PathLike, records: Sequence[dict]) -> Path:
    """One row per cell, as CLIP_benchmark's `build` writes its result files: the record's fields, its metrics as
    columns (empty where a cell lacks one, or where the set was too small for it: acc5 under 5 classes) and
    model_fullname, then the precision the cell ran in (not CLIP_benchmark's; "fp32" for records written before).
    Columns: dataset, model, pretrained, task, the metrics (in order of appearance), language, model_fullname,
    precision."""
    metrics = list(dict.fromkeys(k for r in records for k in r["metrics"]))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*FIRST, *metrics, *LAST])
        writer.writeheader()
        for r in records:
            writer.writerow({**{k: r[k] for k in FIRST}, **r["metrics"], "language": r["language"],
                             "model_fullname": full_name(r), "precision": r.get("precision", "fp32")})  # fmt: skip
    os.replace(tmp, path)
    return path


Column = tuple[str, str]  # (dataset name, task)


def columns(cells: Sequence) -> dict[Column, str]:
    """The (dataset, task) columns of the suite's cells, in order, with their titles: the dataset's title, followed
    by the task where it is not the dataset's own."""
    out: dict[Column, str] = {}
    for c in cells:
        key = (c.dataset.name, c.task)
        if key not in out:
            out[key] = c.dataset.title + ("" if c.task == c.dataset.task else f" ({c.task.replace('_', ' ')})")
    return out


def _scores(records: Sequence[dict]) -> dict[tuple[str, str], dict[Column, float | None]]:
    """(model, pretrained) -> (dataset, task) -> main score, models in order of appearance; a model run in another
    precision than fp32 is a row of its own, its pretrained tag followed by the precision ("openai [bf16]")."""
    table: dict[tuple[str, str], dict[Column, float | None]] = {}
    for r in records:
        precision = r.get("precision", "fp32")
        tag = r["pretrained"] if precision == "fp32" else f"{r['pretrained']} [{precision}]".lstrip()
        table.setdefault((r["model"], tag), {})[r["dataset"], r["task"]] = main_score(r)
    return table


def _average(scores: dict[Column, float | None], keys: Sequence[Column]) -> tuple[float | None, int]:
    """(mean of the scores a model has among `keys`, how many it has)."""
    have = [scores[k] for k in keys if scores.get(k) is not None]
    return (sum(have) / len(have) if have else None), len(have)


def markdown_table(records: Sequence[dict], cells: Sequence) -> str:
    """results.md: a row per model, best average first, with its name, its pretrained tag, the average over the
    zero-shot columns (classification and retrieval, as OpenCLIP's) and a column per (dataset, task); scores with 4
    decimals, as OpenCLIP's docs/openclip_results.csv."""
    titles = columns(cells)
    averaged = [k for k in titles if k[1] in AVERAGED]
    table = _scores(records)
    rows = []
    for (model, pretrained), scores in table.items():
        avg, count = _average(scores, averaged)
        row = ["n/a" if scores.get(k) is None else f"{scores[k]:.4f}" for k in titles]
        full = count == len(averaged)
        mean = "n/a" if avg is None else f"{avg:.4f}" + ("" if full else f" ({count} of {len(averaged)})")
        rows.append((-1.0 if avg is None else avg, [_md(model), _md(pretrained), mean, *row]))
    rows.sort(key=lambda row: -row[0])
    head = ["name", "pretrained", f"Average perf. on {len(averaged)} datasets", *(_md(t) for t in titles.values())]
    lines = ["# Benchmark results", "",
             f"Score per column: {SCORE_HELP}. Each model's average is over the zero-shot classification and "
             "retrieval columns it has. Every metric of every cell is in results.csv.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]  # fmt: skip
    lines += ["| " + " | ".join(cells) + " |" for _, cells in rows]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|") or " "


def write_results_md(path: str | os.PathLike, records: Sequence[dict], cells: Sequence) -> Path:
    path = Path(path)
    path.write_text(markdown_table(records, cells), encoding="utf-8")
    return path


def plot_groups(out_dir: str | os.PathLike, records: Sequence[dict], cells: Sequence,
                groups: dict[str, list[str]]) -> list[Path]:  # fmt: skip
    """A dot plot per group (collection) comparing the models: a row per (dataset, task) whose score is a fraction
    (captioning's CIDEr is not: it stays in the tables) and one for the average, a marker per model. Written to
    out_dir/NAME.png and .svg; none (after one line on stderr) without matplotlib."""
    table = _scores(records)
    if not table:
        return []
    mpl = load_matplotlib()
    if mpl is None:
        return []
    titles = {k: t for k, t in columns(cells).items() if k[1] != CAPTIONING}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for group, names in groups.items():
        keys = [k for n in dict.fromkeys(names) for k in titles if k[0] == n]
        if keys:
            files += _dot_plot(mpl, table, keys, titles, group, out / f"{_file_name(group)}.png")
    return files


def _file_name(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", group)


def _dot_plot(mpl, table: dict, keys: list[Column], titles: dict[Column, str], group: str, path: Path) -> list[Path]:
    labels = ["Average", *(_shorten(titles[k], 36) for k in keys)]
    averaged = [k for k in keys if k[1] in AVERAGED]
    m = len(table)
    fig = new_figure(mpl, 8.5, 1.9 + 0.34 * len(labels) + 0.22 * ((m + 1) // 2))
    ax = fig.subplots()
    for j, ((model, pretrained), scores) in enumerate(table.items()):
        avg, _ = _average(scores, averaged)
        values = [avg, *(scores.get(k) for k in keys)]
        offset = (j - (m - 1) / 2) * min(0.5 / max(m, 1), 0.15)  # side by side within a row, not on top
        points = [(v, i + offset) for i, v in enumerate(values) if v is not None]
        ax.scatter([v for v, _ in points], [y for _, y in points], s=42, marker=MARKERS[j % len(MARKERS)],
                   color=f"C{j % 10}", zorder=3, label=_shorten(f"{model} {pretrained}".strip(), 60))  # fmt: skip
    ax.set_yticks(range(len(labels)), labels, fontsize=10)
    ax.invert_yaxis()
    ax.axhline(0.5, color="0.5", lw=0.8)  # the average above, the datasets below
    ax.set_xlim(-0.02, 1.02)
    ax.xaxis.set_major_formatter(mpl.ticker.PercentFormatter(1.0))
    ax.grid(axis="x", alpha=0.35)
    tasks = {k[1] for k in keys}
    ax.set_xlabel("classification: top-1 accuracy; retrieval: mean of image and text recall@5"
                  if tasks <= set(AVERAGED) else "score (results.md says which, per task)", fontsize=10)  # fmt: skip
    ax.set_title(f"{group}: {m} model(s) on {len(keys)} dataset(s)", fontsize=13)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1 - 0.3 / len(labels)), ncol=min(2, m), fontsize=9,
              frameon=False)  # fmt: skip
    return save_figure(mpl, fig, path)


def _shorten(text: str, width: int) -> str:
    """A long title (a spec's path) keeps its end, where the file's name is."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]
