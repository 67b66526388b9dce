"""Captions by matching for CLIP models without a caption decoder: phrase banks ranked against an image, chained.

The approach of CLIP Interrogator (pharmapsychotic/clip-interrogator, `Interrogator.interrogate`): take the subject
phrase closest to the image, then greedily append ", " + the modifier that brings the whole caption's text embedding
closest to the image, for as long as the cosine similarity improves. Each bank's text embeddings are computed once
per (model, bank), in batches, and cached on disk as a safetensors file (`embed_bank`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checkpoints.io import apply_umask

DEFAULT_CACHE_DIR = "~/.cache/clipworks/phrases"
MODIFIERS_FILE = Path(__file__).resolve().parent.parent / "assets" / "phrases" / "modifiers.txt"
SUBJECT_TEMPLATE = "a photo of a {}"  # the default subject bank: this over OpenAI's ImageNet class names
_FORMAT = 1  # bumped when what a cache file holds changes: older files then miss instead of being misread


@dataclass(frozen=True)
class PhraseBank:
    """A named list of distinct phrases, in the order given."""

    name: str
    phrases: tuple[str, ...]

    @classmethod
    def from_phrases(cls, name: str, phrases: Iterable[str]) -> PhraseBank:
        """A bank of the stripped, non-empty `phrases`, duplicates dropped (the first kept).

        Raises:
            ValueError: no phrase is left.
        """
        kept = dict.fromkeys(p.strip() for p in phrases if p.strip())
        if not kept:
            raise ValueError(f"phrase bank {name!r} is empty: it needs at least one phrase")
        return cls(name, tuple(kept))

    @classmethod
    def from_file(cls, path: str | os.PathLike, name: str | None = None) -> PhraseBank:
        """A bank read from a UTF-8 text file of one phrase a line; blank lines and lines starting with "#" are
        ignored, duplicates dropped. Named after the file's stem unless `name` is given.

        Raises:
            ValueError: the file cannot be read, is not UTF-8, or holds no phrase.
        """
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ValueError(f"phrase bank {path}: cannot read it ({reason})") from e
        lines = [line for line in text.splitlines() if not line.strip().startswith("#")]
        try:
            return cls.from_phrases(name or path.stem, lines)
        except ValueError as e:
            raise ValueError(f"phrase bank {path} has no phrases (blank lines and # comments do not count)") from e


def default_subject_bank() -> PhraseBank:
    """"a photo of a {name}" for each of OpenAI's ImageNet class names (998 distinct: two names repeat)."""
    from .prompts import imagenet_class_names

    return PhraseBank.from_phrases("imagenet", (SUBJECT_TEMPLATE.format(n) for n in imagenet_class_names()))


def default_modifier_bank() -> PhraseBank:
    """The shipped bank of photographic, medium and style terms (assets/phrases/modifiers.txt)."""
    return PhraseBank.from_file(MODIFIERS_FILE)


class TextEncoder:
    """Normalised text features of one model, in batches, on the CPU in float32.

    Args:
        model: a CLIP model (put in eval mode here).
        tokenizer: the model's tokenizer (`clipworks.get_tokenizer(model)`).
        identity: what identifies the weights for the disk cache (`eval.embed.model_identity`); None (random
            weights) never caches on disk.
        device: where the model is.
        batch_size: texts encoded together.

    Attributes:
        encoded: how many texts have gone through the text tower (cache hits add nothing).
    """

    def __init__(self, model, tokenizer, *, identity: str | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 256):  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.tokenizer, self.identity = model.eval(), tokenizer, identity
        self.device, self.batch_size = device, batch_size
        self.encoded = 0
        self._framing = sum(getattr(tokenizer, t, None) is not None for t in ("sot_token_id", "eot_token_id"))

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        """Features (T, E) of `texts`, each of unit norm."""
        parts = [torch.zeros(0, self.model.config.embed_dim)]
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i : i + self.batch_size])).to(self.device)  # (B, L)
            parts.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        self.encoded += len(texts)
        return torch.cat(parts)

    def fits(self, text: str) -> bool:
        """Whether `text` fits the model's context untruncated (a truncated caption would be scored on a prefix)."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:
            return True
        return len(encode(text)) + self._framing <= self.tokenizer.context_length


@dataclass(frozen=True)
class EmbeddedBank:
    """A phrase bank with the text features (P, E) of its phrases, in the same order."""

    bank: PhraseBank
    features: Tensor


def bank_key(identity: str, bank: PhraseBank) -> str:
    """The cache key of a bank's embeddings: a hash of the model identity and the phrases (not the bank's name)."""
    return hashlib.sha256(json.dumps([_FORMAT, identity, list(bank.phrases)]).encode()).hexdigest()[:32]


def embed_bank(bank: PhraseBank, encoder: TextEncoder, cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR
               ) -> EmbeddedBank:  # fmt: skip
    """A bank's text features, read from the cache or computed (in batches) and written to it.

    A cache file is trusted only if it holds features of the expected shape whose SHA-256 matches the one stored
    with them; anything else (truncated, corrupted, another format) is recomputed and replaced. Files are written
    to a temporary name and renamed into place, so no reader ever sees a half-written one.

    Args:
        bank: the phrases.
        encoder: the model's `TextEncoder`; with `identity` None nothing is read from or written to disk.
        cache_dir: the cache folder; None disables the cache.
    """
    if cache_dir is None or encoder.identity is None:
        return EmbeddedBank(bank, encoder(bank.phrases))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", bank.name)[:40]
    path = Path(cache_dir).expanduser() / f"{name}-{bank_key(encoder.identity, bank)}.safetensors"
    features = _read_cached(path, len(bank.phrases))
    if features is None:
        features = encoder(bank.phrases)
        _write_cached(path, features)
    return EmbeddedBank(bank, features)


def _digest(features: Tensor) -> str:
    return hashlib.sha256(features.contiguous().numpy().tobytes()).hexdigest()


def _read_cached(path: Path, rows: int) -> Tensor | None:
    """The features cached at `path`, or None when there are none or they cannot be trusted."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            digest = (f.metadata() or {}).get("sha256")
            features = f.get_tensor("features")
    except Exception:  # safetensors raises its own error types (and OSError, ValueError) for a damaged file
        return None
    ok = features.dim() == 2 and len(features) == rows and features.dtype == torch.float32
    return features if ok and digest == _digest(features) else None


def _write_cached(path: Path, features: Tensor) -> None:
    """Write `features` to `path` atomically; a cache that cannot be written is skipped (the features are kept)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": features.contiguous()}, str(tmp), metadata={"sha256": _digest(features)})
        apply_umask(tmp)  # safetensors writes 0600 whatever the umask
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def rank_phrases(image_features: Tensor, bank: EmbeddedBank, k: int) -> list[tuple[str, float]]:
    """The `k` phrases of `bank` closest to one image (features (E,)), as (phrase, cosine similarity), best first."""
    sims = bank.features @ _unit(image_features)  # (P,)
    scores, index = sims.topk(min(k, len(sims)))
    return [(bank.bank.phrases[i], s) for i, s in zip(index.tolist(), scores.tolist())]


def _unit(image_features: Tensor) -> Tensor:
    """One image's features as a float32 CPU vector (E,) of unit norm."""
    x = image_features.detach().float().cpu().reshape(-1)
    return F.normalize(x, dim=0)


@dataclass(frozen=True)
class MatchedCaption:
    """A caption by matching for one image.

    Attributes:
        caption: the best subject phrase, then ", " and each appended modifier.
        similarity: cosine similarity of the caption's text embedding to the image.
        subjects: the top subject phrases with their cosine similarities, best first.
        modifiers: the modifiers appended, in order; each raised the similarity.
    """

    caption: str
    similarity: float
    subjects: tuple[tuple[str, float], ...]
    modifiers: tuple[str, ...]


def caption_by_matching(image_features: Tensor, subject_bank: EmbeddedBank, modifier_banks: Sequence[EmbeddedBank],
                        encoder: TextEncoder, *, max_modifiers: int = 4, candidates: int = 32,
                        top: int = 5) -> MatchedCaption:  # fmt: skip
    """Caption one image by matching: the best subject phrase, then CLIP Interrogator's chain of modifiers.

    The candidates are the `candidates` phrases of each modifier bank closest to the image on their own. At each
    step every remaining candidate is appended in turn ("caption, candidate"), the resulting captions are encoded,
    and the best one is kept if its similarity to the image beats the current caption's; otherwise the chain stops.
    Candidates that would overflow the model's context are skipped.

    Args:
        image_features: one image's features (E,) from `encode_image`.
        subject_bank: the embedded subject phrases; the caption starts with the best of them.
        modifier_banks: the embedded modifier banks (may be empty).
        encoder: the model's `TextEncoder`, which encodes the chained captions.
        max_modifiers: most modifiers appended; 0 gives the best subject phrase alone.
        candidates: modifiers pre-selected per bank.
        top: subject phrases returned with their scores (at least the best one).

    Raises:
        ValueError: a negative `max_modifiers`, or `candidates` / `top` below 1.
    """
    if max_modifiers < 0 or candidates < 1 or top < 1:
        raise ValueError(f"need max_modifiers >= 0, candidates >= 1 and top >= 1; got {max_modifiers}, "
                         f"{candidates}, {top}")  # fmt: skip
    image = _unit(image_features)
    subjects = rank_phrases(image, subject_bank, top)
    caption, best = subjects[0]
    pool = [p for bank in modifier_banks for p, _ in rank_phrases(image, bank, candidates)] if max_modifiers else []
    pool = [p for p in dict.fromkeys(pool) if p != caption]
    added: list[str] = []
    while len(added) < max_modifiers:
        options = [p for p in pool if encoder.fits(f"{caption}, {p}")]
        if not options:
            break
        sims = encoder([f"{caption}, {p}" for p in options]) @ image  # (C,)
        j = int(sims.argmax())
        if sims[j] <= best:
            break
        caption, best = f"{caption}, {options[j]}", float(sims[j])
        added.append(options[j])
        pool.remove(options[j])
    return MatchedCaption(caption, best, tuple(subjects), tuple(added))
