"""Class names and prompt templates: OpenAI's ImageNet names, its 80 templates and the 7-template subset."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from ..train.zeroshot import build_classifier

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "zeroshot"
# "imagenet": OpenAI's 80 ImageNet templates; "simple": the 7 of them OpenAI's notebook found best;
# "photo": "a photo of a {}." alone.
TEMPLATE_SETS = ("imagenet", "simple", "photo")


@lru_cache(maxsize=1)
def _template_table() -> dict[str, tuple[str, ...]]:
    table = json.loads((ASSETS / "templates.json").read_text(encoding="utf-8"))
    return {k: tuple(v) for k, v in table.items()}


def imagenet_class_names() -> list[str]:
    """OpenAI's 1000 ImageNet class names, in class-index order (two names repeat, as in OpenAI's list)."""
    return (ASSETS / "imagenet_classnames.txt").read_text(encoding="utf-8").splitlines()


def load_templates(name: str) -> list[str]:
    """A shipped template set ("imagenet", "simple", "photo") or a file of templates, each with one "{}".

    A file holds one template a line (blank lines and lines starting with "#" ignored) or a JSON list.

    Raises:
        ValueError: unknown name, or a template without exactly one "{}".
        FileNotFoundError: `name` is neither a set nor an existing file.
    """
    if name in TEMPLATE_SETS:
        return list(_template_table()[name])
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"templates {name!r}: not one of {', '.join(TEMPLATE_SETS)} and no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        templates = json.loads(text)
        if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
            raise ValueError(f"{path}: expected a JSON list of template strings")
    else:
        templates = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not templates:
        raise ValueError(f"{path}: no templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"{path}: each template needs exactly one {{}} for the class name; bad: {bad[:3]}")
    return templates


def parse_labels(text: str) -> list[str]:
    """Class names from a comma-separated list, stripped.

    Raises:
        ValueError: an empty name, fewer than one name, or a name given twice.
    """
    names = [n.strip() for n in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise ValueError(f"--labels {text!r}: expected comma-separated non-empty class names")
    return check_unique(names, "--labels")


def check_unique(names: Sequence[str], what: str) -> list[str]:
    """`names` as a list, or a ValueError naming the duplicates."""
    seen: set[str] = set()
    dup = [n for n in names if n in seen or seen.add(n)]
    if dup:
        raise ValueError(f"{what}: duplicate class names {sorted(set(dup))}; each class must be named once")
    return list(names)


@torch.no_grad()
def zero_shot_weights(model, tokenizer: Callable[[list[str]], Tensor], class_names: Sequence[str],
                      templates: Sequence[str], device: torch.device | str = "cpu",
                      max_prompts: int = 4096) -> Tensor:  # fmt: skip
    """Class embeddings (C, E) as `build_classifier` makes them, a few classes at a time so that 1000 classes
    x 80 templates never go through the text tower in one batch."""
    step = max(1, max_prompts // max(len(templates), 1))
    chunks = [build_classifier(model, tokenizer, class_names[i : i + step], templates, device)
              for i in range(0, len(class_names), step)]  # fmt: skip
    return torch.cat(chunks)
