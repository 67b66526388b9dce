"""The benchmark suite (`clipworks benchmark`): models x datasets, each (model, dataset, task) cell evaluated once.

A dataset is named by a data spec (`cifar10:/data/cifar-10-batches-bin`, optionally `NAME=SPEC` to name it in the
tables) or by CLIP_benchmark's name (`vtab/caltech101`, `mscoco_captions`, ...), found under a dataset root as
CLIP_benchmark's WebDataset export `ROOT/wds_NAME` (`/` written `-`, as the hub's clip-benchmark/wds_NAME) or, with
`download`, fetched from the hub into its cache when the cell is computed, or by a
collection of such names (`vtab`, `vtab+`, `retrieval`, `imagenet_robustness`). The collections, tasks and titles
are data: assets/benchmark/datasets.json.

A finished cell is a JSON file under OUT/cells/ in CLIP_benchmark's result layout (dataset, model, pretrained, task,
metrics, language), so `clip_benchmark build OUT/cells` reads them too. It is written to a temporary name and
renamed, so a killed run leaves finished cells or none, and a rerun computes only the cells without a file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .sources import OPTIONS, parse_spec
from .suite_tasks import (CLASSIFICATION, OTHER_TASKS, RETRIEVAL, SCORE_HELP, SCORE_NAMES, SELECTION, TASKS,  # noqa: F401
                          NotApplicable, main_score)  # fmt: skip

TABLE = Path(__file__).resolve().parent.parent / "assets" / "benchmark" / "datasets.json"
HUB_ORG = "clip-benchmark"  # the hub organisation that publishes CLIP_benchmark's exports, as wds_NAME datasets
LANGUAGE = "en"
RETRIEVAL_SCHEMES = ("coco", "karpathy")  # the data specs of captioned sets only
PAIRED_SCHEMES = ("sugarcrepe", "winoground")  # CLIP_benchmark's image_caption_selection task


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(TABLE.read_text(encoding="utf-8"))


def collections() -> dict[str, list[str]]:
    """CLIP_benchmark's collections: name -> dataset names."""
    return _table()["collections"]


def known_datasets() -> dict[str, dict]:
    """CLIP_benchmark's dataset names -> {"task", "title", and "export" or "unsupported" where they apply}."""
    return _table()["datasets"]


def export_dir_name(name: str) -> str:
    """The folder (and hub dataset) CLIP_benchmark's WebDataset export of `name` is called: wds_vtab-cifar10."""
    entry = known_datasets().get(name, {})
    return "wds_" + entry.get("export", name).replace("/", "-")


@dataclass(frozen=True)
class SuiteDataset:
    """One dataset of the suite.

    Attributes:
        name: the results' "dataset" (CLIP_benchmark's name, the NAME of NAME=SPEC, or the spec itself).
        spec: what `sources.load_classification` / `load_captioned` read.
        task: its default task (CLIP_benchmark's get_dataset_default_task): CLASSIFICATION, RETRIEVAL or
            SELECTION; `OTHER_TASKS` names those it can also run.
        title: its column head in results.md and the plots.
        given: named by a spec, which is then part of its cells' identity.
    """

    name: str
    spec: str
    task: str
    title: str
    given: bool = False


@dataclass
class Plan:
    """The datasets a `--datasets` list names, grouped for the plots (a collection, or "datasets" for the rest), and
    those that cannot run: `missing` (no export under the root: `missing_data` says what to fetch) and `unsupported`
    (a message each)."""

    datasets: list[SuiteDataset] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (name, export folder)
    unsupported: list[str] = field(default_factory=list)


def plan_datasets(items: list[str], root: str | os.PathLike | None, download: bool = False) -> Plan:
    """Resolve `--datasets` items: collections, CLIP_benchmark names (under `root`, else from the hub with
    `download`) and specs, in order, each once.

    Raises:
        ValueError: an item that is neither a spec, a collection nor a dataset name.
    """
    plan, resolved = Plan(), {}
    for item in items:
        item = item.strip().removeprefix("wds/")
        names = collections().get(item)
        group = item if names is not None else "datasets"
        for name in names if names is not None else [item]:
            if name not in resolved:
                dataset = resolved[name] = _resolve(name, root, plan, download)
                if dataset is not None:
                    if any(d.name == dataset.name for d in plan.datasets):
                        raise ValueError(f"two datasets are named {dataset.name!r} in --datasets; name one otherwise "
                                         "(NAME=SPEC)")  # fmt: skip
                    plan.datasets.append(dataset)
            dataset = resolved[name]
            if dataset is not None and dataset.name not in plan.groups.get(group, []):
                plan.groups.setdefault(group, []).append(dataset.name)
    return plan


def _resolve(item: str, root, plan: Plan, download: bool) -> SuiteDataset | None:
    alias, eq, rest = item.partition("=")
    if eq and ":" not in alias and "?" not in alias:  # NAME=SPEC (a spec's own "=" follows its ":" or "?")
        return _from_spec(rest, alias.strip())
    if ":" in item:
        return _from_spec(item, item)
    known = known_datasets()
    entry = known.get(item)
    folder = export_dir_name(item)
    found = Path(root).expanduser() / folder if root is not None else None
    if entry is None and (found is None or not found.is_dir()):
        export = f" nor an export in {found}" if found else ""
        raise ValueError(f"unknown dataset {item!r}: neither a data spec (SCHEME:PATH, SCHEME one of "
                         f"{', '.join(OPTIONS)}), a collection ({', '.join(collections())}), one of CLIP_benchmark's "
                         f"dataset names (clipworks benchmark --list){export}")  # fmt: skip
    if entry is not None and "unsupported" in entry:
        plan.unsupported.append(f"{item}: {entry['unsupported']}")
        return None
    if found is None or not (found / "test" / "nshards.txt").is_file():
        if entry is None or not download:
            plan.missing.append((item, folder))
            return None
        return SuiteDataset(item, f"wds-benchmark:hf-hub:{HUB_ORG}/{folder}", entry["task"], entry["title"])
    spec = f"wds-benchmark:{found}"
    task = entry["task"] if entry is not None else spec_task(spec)
    return SuiteDataset(item, spec, task, entry["title"] if entry is not None else item)


def missing_data(missing: list[tuple[str, str]], root: str | os.PathLike | None) -> str:
    """One line saying which datasets have no data and what to fetch (hf-hub:clip-benchmark/wds_NAME) into where."""
    from .datasets.wds_benchmark import fetch_command

    name, folder = missing[0]
    where = str(Path(root).expanduser()) if root is not None else "DIR"
    fetch = fetch_command(f"{HUB_ORG}/{folder}", "test", f"{where}/{folder}")
    hub = "; or pass --download to fetch from the hub into its cache"
    if len(missing) > 1:
        names = ", ".join(n for n, _ in missing)
        give = "" if root is not None else "give --dataset-root DIR and "
        return (f"no data for {len(missing)} datasets ({names}): {give}fetch each hf-hub:{HUB_ORG}/wds_NAME into "
                f"{where}/wds_NAME ('/' in NAME written '-'), e.g. {fetch}{hub}")  # fmt: skip
    if root is None:
        return (f"{name} is read from CLIP_benchmark's export: give --dataset-root DIR and fetch hf-hub:{HUB_ORG}/"
                f"{folder} into DIR/{folder} ({fetch}){hub}")  # fmt: skip
    return (f"no data for {name}: {where}/{folder}/test/nshards.txt is missing; fetch hf-hub:{HUB_ORG}/{folder} "
            f"into {where}/{folder} ({fetch}){hub}")  # fmt: skip


def _from_spec(spec: str, name: str) -> SuiteDataset:
    parsed = parse_spec(spec)
    hub = parsed.scheme == "wds-benchmark" and (parsed.path.startswith("hf-hub:") or "://" in parsed.path)
    if parsed.scheme != "synthetic" and not hub and not Path(parsed.path).expanduser().exists():
        raise FileNotFoundError(f"{spec}: no such file or folder {parsed.path!r}")  # before any model is loaded
    entry = known_datasets().get(name, {})
    return SuiteDataset(name, spec, spec_task(spec), entry.get("title", name), given=True)


def spec_task(text: str) -> str:
    """The task a data spec's set is for: retrieval for captions (`coco:`, `karpathy:`, a csv/tsv with a caption
    column and no label column, a wds-benchmark export whose dataset_type.txt says so), image-caption selection for
    `sugarcrepe:` and `winoground:`, else zero-shot classification.

    Raises:
        ValueError: a bad spec.
    """
    spec = parse_spec(text)
    if spec.scheme in PAIRED_SCHEMES:
        return SELECTION
    if spec.scheme in RETRIEVAL_SCHEMES:
        return RETRIEVAL
    if spec.scheme in ("csv", "tsv"):
        with open(Path(spec.path).expanduser(), newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f, delimiter="," if spec.scheme == "csv" else "\t"), [])
        header = [h.strip() for h in header]
        if spec.options["label"] not in header and spec.options["caption"] in header:
            return RETRIEVAL
        return CLASSIFICATION
    if spec.scheme == "wds-benchmark":
        if spec.path.startswith("hf-hub:"):  # the task its name has, before anything is fetched
            folder = spec.path.removeprefix("hf-hub:").partition("@")[0].rpartition("/")[2]
            known = [e["task"] for n, e in known_datasets().items() if export_dir_name(n) == folder and "task" in e]
            if known:
                return known[0]
        from .datasets.wds_benchmark import export_root

        kind = export_root(spec) / "dataset_type.txt"  # a hub or URL export is fetched first
        return RETRIEVAL if kind.is_file() and kind.read_text().strip().lower() == "retrieval" else CLASSIFICATION
    return CLASSIFICATION


@dataclass(frozen=True)
class SuiteModel:
    """A model of the suite: `spec` is what `create_model_and_transforms` takes (NAME:TAG, NAME:FILE, local-dir:DIR,
    hf-hub:ORG/REPO or a preset NAME); `model` and `pretrained` are CLIP_benchmark's columns for it. `precision`:
    the inference precision its cells are computed in ("auto" made concrete for the machine first), part of each
    cell's identity: a rerun in another precision computes its own cells."""

    spec: str
    precision: str = "fp32"

    @property
    def model(self) -> str:
        return self.spec if self.spec.startswith(("local-dir:", "hf-hub:")) else self.spec.split(":", 1)[0]

    @property
    def pretrained(self) -> str:
        return "" if self.model == self.spec else self.spec.split(":", 1)[1]


@dataclass(frozen=True)
class Cell:
    """One (model, dataset, task) evaluation."""

    model: SuiteModel
    dataset: SuiteDataset
    task: str

    def file_name(self) -> str:
        """A readable, unique file name: the slugs, then a hash of what identifies the cell."""
        key = [self.model.spec, self.dataset.name, self.dataset.spec if self.dataset.given else "", self.task]
        if self.model.precision != "fp32":  # fp32 cells keep the names they had before precisions existed
            key.append(self.model.precision)
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:10]
        slug = "__".join(_slug(s)[-48:] for s in (self.model.spec, self.dataset.name))  # the ends: dir names
        return f"{slug}__{self.task}-{digest}.json"

    def label(self) -> str:
        precision = "" if self.model.precision == "fp32" else f" in {self.model.precision}"
        return f"{self.model.spec}{precision} × {self.dataset.name} ({self.task})"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def read_cell(path: Path) -> dict | None:
    """A finished cell's record, or None when there is none (or it does not parse: then it is computed again)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("metrics"), dict) else None


def write_cell(path: Path, record: dict) -> None:
    """Write a cell's record atomically: readers (and a rerun after a kill) see the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def plan_cells(models: list[SuiteModel], datasets: list[SuiteDataset], tasks: list[str]) -> tuple[list[Cell], list[str]]:
    """The cells of models x datasets x `tasks` ("auto": each dataset's default task), and a line for each
    (dataset, task) that cannot run (a task the dataset's kind does not have).

    Raises:
        ValueError: an unknown task.
    """
    bad = [t for t in tasks if t not in ("auto", *TASKS)]
    if bad:
        raise ValueError(f"unknown task {bad[0]!r}: choose from auto, {', '.join(TASKS)}")
    from .suite_tasks import LINEAR_PROBE, train_spec

    pairs, skipped = [], []
    for d in datasets:
        for task in dict.fromkeys(d.task if t == "auto" else t for t in tasks):
            if task != d.task and task not in OTHER_TASKS[d.task]:
                can = ", ".join((d.task, *OTHER_TASKS[d.task]))
                skipped.append(f"{d.name}: not a {task} set (it runs {can})")
                continue
            try:
                if task == LINEAR_PROBE:
                    train_spec(d.spec)
            except ValueError as e:
                skipped.append(f"{d.name} ({task}): {e}")
                continue
            pairs.append((d, task))
    return [Cell(m, d, t) for m in models for d, t in pairs], skipped


def cell_record(cell: Cell, metrics: dict, precision: str | None = None) -> dict:
    """CLIP_benchmark's result layout for a cell (its metrics already under CLIP_benchmark's names), with the
    precision the model ran in (`precision`, the one applied; else the cell's)."""
    return {"dataset": cell.dataset.name, "model": cell.model.model, "pretrained": cell.model.pretrained,
            "task": cell.task, "metrics": metrics, "language": LANGUAGE,
            "precision": precision or cell.model.precision}  # fmt: skip


@dataclass
class SuiteRun:
    """What a run did: cells found finished, computed now, not applicable (the model cannot run the task: no
    file, so a rerun asks again) and failed (with why)."""

    done_before: int = 0
    computed: int = 0
    not_applicable: int = 0
    failed: list[tuple[Cell, str]] = field(default_factory=list)


def run_suite(cells: list[Cell], cells_dir: Path, load_embedder: Callable, log: Callable[[str], None] = print,
              failures: tuple[type[Exception], ...] = (ValueError, OSError, ImportError)) -> SuiteRun:  # fmt: skip
    """Evaluate every cell without a file in `cells_dir`, model by model (each loaded once, and only when one of its
    cells is left), writing each record as it finishes. A model or dataset that fails (one of `failures`) fails its
    cells, reported through `log`, and the run goes on.

    Args:
        load_embedder: a SuiteModel -> `Embedder` of that model.
        log: one line per computed or failed cell: "cell 3/12: M × D (task): acc1 0.6120, 812 images/s".
    """
    run, data = SuiteRun(), {}
    todo = [(k, c) for k, c in enumerate(cells, 1) if read_cell(cells_dir / c.file_name()) is None]
    run.done_before = len(cells) - len(todo)
    for model in dict.fromkeys(c.model for _, c in todo):
        mine = [(k, c) for k, c in todo if c.model == model]
        try:
            embedder = load_embedder(model)
        except failures as e:
            for k, c in mine:
                run.failed.append((c, f"loading {model.spec}: {e}"))
                log(f"cell {k}/{len(cells)}: {c.label()}: failed: loading the model: {e}")
            continue
        for k, cell in mine:
            embedder.progress_prefix = f"cell {k}/{len(cells)}: "  # the bars say which cell they belong to
            start, before = time.perf_counter(), embedder.embedded["images"]
            try:
                metrics = _evaluate(embedder, cell, data)
            except NotApplicable as e:
                run.not_applicable += 1
                log(f"cell {k}/{len(cells)}: {cell.label()}: skipped: {e}")
                continue
            except failures as e:
                run.failed.append((cell, str(e)))
                log(f"cell {k}/{len(cells)}: {cell.label()}: failed: {e}")
                continue
            record = cell_record(cell, metrics, getattr(embedder, "precision", None))
            write_cell(cells_dir / cell.file_name(), record)
            run.computed += 1
            seconds, images = time.perf_counter() - start, embedder.embedded["images"] - before
            speed = f"{images / seconds:.0f} images/s" if images else "image features from the cache"
            score = main_score(record)
            log(f"cell {k}/{len(cells)}: {cell.label()}: {SCORE_NAMES[cell.task]} "
                f"{'n/a' if score is None else f'{score:.4f}'}, {speed}")  # fmt: skip
    return run


def _evaluate(embedder, cell: Cell, data: dict) -> dict:
    """The metrics of one cell; each (dataset, task)'s data is read once per run (or fails once: the error is kept)."""
    from . import suite_tasks

    key = (cell.dataset.name, cell.task)
    if key not in data:
        try:
            data[key] = suite_tasks.load(cell.dataset.spec, cell.task)
        except Exception as e:
            data[key] = e
    loaded = data[key]
    if isinstance(loaded, Exception):
        raise loaded
    return suite_tasks.evaluate(embedder, cell.task, loaded)
