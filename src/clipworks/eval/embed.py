"""Image and text features for evaluation: batched, with progress bars, cached on disk, split across ranks.

Under `torchrun` (torch.distributed initialised with more than one process) each rank embeds every
world_size-th item and the features are gathered, so every rank holds all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checkpoints.io import apply_umask
from ..data.decode import ImageDecodeError
from ..models.quant import is_quantized
from ..train.distributed import everywhere, rank_world
from .sources import ImageSet

DEFAULT_CACHE_DIR = "~/.cache/clipworks/features"


@dataclass
class ImageFeatures:
    """Normalised features (N, E) of an image set; rows of unreadable images are zero and `valid` False."""

    features: Tensor
    valid: Tensor

    @property
    def skipped(self) -> int:
        """How many images could not be read."""
        return int((~self.valid).sum())


def model_identity(name: str, pretrained: str | None) -> str | None:
    """What identifies a model's weights for the cache, or None when they are random (nothing to cache).

    A registry tag is its own identity (the hub checks the file's hash); a local file or checkpoint
    directory adds each file's size and modification time.
    """
    name_path = name[len("local-dir:") :] if name.startswith("local-dir:") else None
    target = pretrained if pretrained is not None else name_path
    if target is None:
        return f"{name}" if name.startswith("hf-hub:") or ":" in name else None
    path = Path(target).expanduser()
    if not path.exists():
        return f"{name}|{pretrained}"  # a registry tag
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [f"{p.relative_to(path) if path.is_dir() else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
             for p in files]  # fmt: skip
    return f"{name}|{pretrained}|{path.resolve()}|" + ",".join(stats)


def progress(items: Iterable, total: int, desc: str, enabled: bool, count: Callable | None = None,
             unit: str = "it") -> Iterable:  # fmt: skip
    """`items` with a tqdm progress bar on stderr when enabled and tqdm is installed. With `count`, the bar counts
    `count(item)` of `unit` per item (images in a batch) out of `total` of them, and shows their rate."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    if count is None:
        return tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False)
    return _counted(items, tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit=unit), count)


def _counted(items: Iterable, bar, count: Callable) -> Iterable:
    with bar:
        for item in items:
            yield item
            bar.update(count(item))  # once the caller has processed it


class _Decoded(torch.utils.data.Dataset):
    """Item k: (index, transformed image or None for an unreadable one) for `indices[k]` of an image set."""

    def __init__(self, images: ImageSet, indices: list[int], transform: Callable):
        self.images, self.indices, self.transform = images, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        try:
            return i, self.images.preprocess(i, self.transform)
        except (ImageDecodeError, OSError):
            return i, None


def _collate(samples):
    good = [(i, x) for i, x in samples if x is not None]
    indices = torch.tensor([i for i, _ in samples], dtype=torch.long)
    images = torch.stack([x for _, x in good]) if good else None  # (B', 3, S, S)
    ok = torch.tensor([x is not None for _, x in samples])
    return indices, images, ok


class Embedder:
    """Embeds image sets and texts with one model.

    Args:
        model: a CLIP model (eval mode is set here).
        transform: the model's evaluation image transform.
        tokenizer: texts -> token ids.
        identity: `model_identity(...)`, or None to never cache (random weights).
        cache_dir: where features are cached; None disables the cache.
        batch_size, workers, device: how to embed.
        show_progress: tqdm bars on stderr (rank 0 only), headed `progress_prefix` + "images" / "texts".
    """

    def __init__(self, model, transform: Callable, tokenizer: Callable, *, identity: str | None = None,
                 cache_dir: str | os.PathLike | None = None, batch_size: int = 64, workers: int = 0,
                 device: str | torch.device = "cpu", show_progress: bool = True):  # fmt: skip
        self.model, self.transform, self.tokenizer = model.eval(), transform, tokenizer
        precision = getattr(model, "precision", "int8" if is_quantized(model) else "fp32")
        if identity is not None and precision != "fp32":  # int8 and bf16 features are cached apart from fp32 ones
            identity = f"{identity} {precision}"
        self.identity, self.batch_size, self.workers, self.device = identity, batch_size, workers, device
        self.cache = Path(cache_dir).expanduser() if cache_dir is not None and identity is not None else None
        self.rank, self.world_size = rank_world()
        self.show_progress = show_progress and self.rank == 0
        self.progress_prefix = ""  # e.g. "cell 3/12: " (`clipworks benchmark`)
        self.embedded = {"images": 0, "texts": 0}  # what was actually run through the towers (not cached)
        self.cache_hits = 0

    def _key(self, kind: str, data: str) -> str:
        return hashlib.sha256(json.dumps([self.identity, kind, data]).encode()).hexdigest()[:32]

    def _cached(self, key: str, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        if self.cache is None:
            return compute()
        from safetensors.torch import load_file, save_file

        path = self.cache / f"{key}.safetensors"
        if everywhere(path.is_file(), self.device):  # ranks must agree, or one would wait in a gather the others skip
            self.cache_hits += 1
            return load_file(path)
        out = compute()
        if self.rank == 0:
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({k: v.contiguous() for k, v in out.items()}, tmp)
            apply_umask(tmp)  # safetensors writes 0600 whatever the umask
            os.replace(tmp, path)  # readers never see a half-written file
        return out

    def images(self, images: ImageSet) -> ImageFeatures:
        """Normalised features of every image in the set (unreadable ones marked invalid)."""
        key = self._key("images", images.fingerprint() + repr(getattr(self.model, "preprocess_config", None)))
        out = self._cached(key, lambda: self._embed_images(images))
        return ImageFeatures(out["features"], out["valid"].bool())

    @torch.no_grad()
    def _embed_images(self, images: ImageSet) -> dict[str, Tensor]:
        mine = list(range(self.rank, len(images), self.world_size))
        loader = torch.utils.data.DataLoader(_Decoded(images, mine, self.transform), batch_size=self.batch_size,
                                             num_workers=self.workers, collate_fn=_collate)  # fmt: skip
        dim = self.model.config.embed_dim
        idx, feats, oks = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dim)], [torch.zeros(0, dtype=torch.bool)]
        bar = progress(loader, len(mine), f"{self.progress_prefix}images", self.show_progress, lambda b: len(b[0]),
                       unit="img")  # fmt: skip
        for indices, batch, ok in bar:
            f = torch.zeros(len(indices), dim)
            if batch is not None:
                f[ok] = self.model.encode_image(batch.to(self.device), normalize=True).float().cpu()
            idx.append(indices), feats.append(f), oks.append(ok)
        self.embedded["images"] += len(mine)
        index, features, valid = _gather(torch.cat(idx), torch.cat(feats), torch.cat(oks))
        out_f, out_v = torch.zeros(len(images), dim), torch.zeros(len(images), dtype=torch.bool)
        out_f[index], out_v[index] = features, valid
        return {"features": out_f, "valid": out_v.to(torch.uint8)}

    def texts(self, texts: Sequence[str]) -> Tensor:
        """Normalised features (T, E) of `texts`."""
        key = self._key("texts", hashlib.sha256("\0".join(texts).encode()).hexdigest())
        return self._cached(key, lambda: {"features": self._embed_texts(list(texts))})["features"]

    @torch.no_grad()
    def _embed_texts(self, texts: list[str]) -> Tensor:
        mine = list(range(self.rank, len(texts), self.world_size))
        chunks = [mine[i : i + self.batch_size * 4] for i in range(0, len(mine), self.batch_size * 4)]
        dim = self.model.config.embed_dim
        feats = [torch.zeros(0, dim)]
        for chunk in progress(chunks, len(chunks), f"{self.progress_prefix}texts", self.show_progress):
            tokens = self.tokenizer([texts[i] for i in chunk]).to(self.device)
            feats.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        self.embedded["texts"] += len(mine)
        mine_t = torch.tensor(mine, dtype=torch.long)
        index, features, _ = _gather(mine_t, torch.cat(feats), torch.ones(len(mine), dtype=torch.bool))
        out = torch.zeros(len(texts), dim)
        out[index] = features
        return out

    def text_weights(self, class_names: Sequence[str], templates: Sequence[str]) -> Tensor:
        """Zero-shot class embeddings (C, E): per class, normalise each template's embedding, average, normalise."""
        if not class_names or not templates:
            raise ValueError("zero-shot weights need at least one class name and one template")
        prompts = [t.format(name) for name in class_names for t in templates]
        f = self.texts(prompts).view(len(class_names), len(templates), -1).mean(dim=1)  # (C, E)
        return F.normalize(f, dim=-1)


def _gather(index: Tensor, features: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate every rank's (index, features, valid); a no-op in a single process."""
    rank, world_size = rank_world()
    if world_size == 1:
        return index, features, valid
    parts: list = [None] * world_size
    torch.distributed.all_gather_object(parts, (index, features, valid))
    return tuple(torch.cat([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]
