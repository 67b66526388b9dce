"""What the dataset adapters share: the spec's folder, class-name files and the shipped prompt templates."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from ..prompts import ASSETS
from ..sources import Spec


def spec_root(spec: Spec) -> Path:
    """The folder a spec names.

    Raises:
        FileNotFoundError: no such path.
        ValueError: the path is a file.
    """
    root = Path(spec.path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {spec.path!r}")
    if not root.is_dir():
        raise ValueError(f"{spec.scheme}:{spec.path}: not a directory")
    return root


def check_split(spec: Spec, splits: tuple[str, ...]) -> str:
    """The spec's `?split=`, which must be one of `splits`."""
    split = spec.options["split"]
    if split not in splits:
        raise ValueError(f"{spec.scheme}:{spec.path}: ?split={split}: choose {' or '.join(splits)}")
    return split


def read_names(path: Path, what: str) -> list[str]:
    """Class names, one a line, in class-index order (trailing blank lines ignored; none may be blank before)."""
    if not path.is_file():
        raise ValueError(f"{what}: no class-name file {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        blank = names.index("") + 1 if names else 1
        raise ValueError(f"{what}: {path} line {blank}: blank class name (one class name a line, in label order)")
    return names


@lru_cache(maxsize=1)
def _template_table() -> dict[str, tuple[str, ...]]:
    table = json.loads((ASSETS / "dataset_templates.json").read_text(encoding="utf-8"))
    return {k: tuple(v) for k, v in table.items()}


def dataset_templates(name: str) -> list[str]:
    """OpenAI's prompt templates for a dataset family ("cifar", "mnist"), each with one "{}"."""
    return list(_template_table()[name])
