"""Textual inversion: embedding files (AUTOMATIC1111's and diffusers') and the placeholder ids that put their
vectors into a prompt.

The model's vocabulary is never resized. A prompt's trigger words become placeholder ids past the tokenizer's
vocabulary (`TextualInversion.encode`), and the encoder reads those ids from a small table of the loaded vectors
(`encode_hidden(..., extra=...)`); prompts without a trigger are encoded exactly as before. An embedding of n
vectors takes n positions, as in A1111 and in diffusers (whose `<tok>`, `<tok>_1`, ... are the same ids).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints.io import CheckpointError, read_weights_file
from ..models.text import TextTransformer
from ..tokenizer import Tokenizer
from .chunks import CHUNK_LENGTH

# diffusers' fixed file names: their trigger is the file's one key, not the file's name.
DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL files: vectors for SDXLText's first and second tower, in that order


@dataclass(frozen=True, eq=False)
class Embedding:
    """A textual-inversion embedding: the word that calls it, and its vectors for each text tower.

    Attributes:
        trigger: the word of a prompt that the vectors replace (matched as a whole word, in any case).
        vectors: one (n, D) tensor per text tower of the model it was made for, the same n in each: one for
            SD 1.x/2.x, two for SDXL (CLIP ViT-L's `clip_l`, then OpenCLIP bigG's `clip_g`).
    """

    trigger: str
    vectors: tuple[Tensor, ...]

    def __post_init__(self):
        if not isinstance(self.trigger, str) or not self.trigger.strip() or self.trigger != self.trigger.strip():
            raise ValueError(f"an embedding's trigger must be a non-empty word, no outer spaces; got {self.trigger!r}")
        if not self.vectors or not all(isinstance(v, Tensor) and v.ndim == 2 and v.is_floating_point()
                                       for v in self.vectors):  # fmt: skip
            raise ValueError(f"embedding {self.trigger!r}: vectors must be (n, D) float tensors, one per text tower")
        counts = sorted({v.shape[0] for v in self.vectors})
        if len(counts) != 1 or not 1 <= counts[0] <= CHUNK_LENGTH:
            raise ValueError(
                f"embedding {self.trigger!r} has {counts} vectors; expected the same count, 1 to {CHUNK_LENGTH}, "
                "for every text tower"
            )

    @property
    def count(self) -> int:
        """How many vectors, so how many prompt positions, the embedding takes."""
        return self.vectors[0].shape[0]


def load_embedding(path: str | Path, trigger: str | None = None) -> Embedding:
    """Read a textual-inversion file: A1111's `.pt` (`string_to_param`) or `.safetensors` (one tensor), SDXL's
    (`clip_l` and `clip_g`), or diffusers' `learned_embeds.safetensors` / `.bin` ({trigger: vectors}).

    Args:
        path: the file; `.safetensors`, or `.pt`/`.bin`/`.pth`/`.ckpt` read with `torch.load(weights_only=True)`.
        trigger: the word that calls it in prompts; by default A1111's rule, the file name without its
            extension, except for diffusers' `learned_embeds.*`, whose one key is the trigger.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is empty, unreadable, or refused by `torch.load(weights_only=True)`.
        ValueError: the file holds no embedding.
    """
    path = Path(path)
    if trigger is None and path.name.lower() not in DIFFUSERS_NAMES:
        trigger = path.stem
    return embedding_from_state_dict(_read(path), trigger, source=str(path))


def _read(path: Path) -> object:
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not an embedding")
    return read_weights_file(path, "embedding")


def embedding_from_state_dict(data: object, trigger: str | None = None, source: str = "embedding") -> Embedding:
    """An `Embedding` from a loaded file's contents (see `load_embedding` for the layouts).

    Args:
        data: what the file held: a dict, or a bare (n, D) tensor.
        trigger: the word that calls it; None for the name the data gives (A1111's `name`, diffusers' key).
        source: the file, for messages.
    """
    name = None
    if isinstance(data, Tensor):
        vectors = (data,)
    elif isinstance(data, dict) and "string_to_param" in data:  # A1111's .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError(f"{source}: string_to_param must hold one tensor, found {_describe(params)}")
        vectors, name = tuple(params.values()), data.get("name")
    elif isinstance(data, dict) and set(SDXL_KEYS) <= set(data):
        vectors = tuple(data[k] for k in SDXL_KEYS)
    elif isinstance(data, dict) and len(data) == 1:  # diffusers' {trigger: vectors}, A1111's {"emb_params": ...}
        ((name, value),) = data.items()
        vectors = (value,)
    else:
        raise ValueError(
            f"{source}: not a textual-inversion embedding; expected string_to_param (A1111), clip_l and clip_g "
            f"(SDXL) or one tensor (diffusers), found {_describe(data)}"
        )
    if not all(isinstance(v, Tensor) and v.ndim in (1, 2) for v in vectors):
        raise ValueError(f"{source}: embedding vectors must be (D,) or (n, D) tensors, found {_describe(vectors)}")
    trigger = trigger if trigger is not None else name
    if not isinstance(trigger, str):
        raise ValueError(f"{source}: the file names no trigger word; pass trigger=")
    return Embedding(trigger, tuple(v.detach().reshape(-1, v.shape[-1]) for v in vectors))


def _describe(obj: object) -> str:
    if isinstance(obj, dict):
        return "keys " + ", ".join(repr(k) for k in list(obj)[:8]) if obj else "an empty dict"
    if isinstance(obj, (tuple, list)):
        return ", ".join(_describe(v) for v in obj)
    return f"a tensor of shape {tuple(obj.shape)}" if isinstance(obj, Tensor) else type(obj).__name__


def _word_pattern(trigger: str) -> str:
    # Whole words, as A1111 matches a trigger's token ids: "mystyle" is not found in "mystyles".
    pattern = r"\s+".join(re.escape(word) for word in trigger.split())
    if re.match(r"\w", trigger):
        pattern = r"(?<!\w)" + pattern
    if re.search(r"\w$", trigger):
        pattern += r"(?!\w)"
    return pattern


class TextualInversion:
    """Loaded embeddings as placeholder ids in prompts, and the vectors those ids stand for.

    Embedding k's i-th vector has id `tokenizer.vocab_size + offset_k + i`: row `offset_k + i` of `vectors(...)`.

    Args:
        embeddings: the embeddings, each with its own trigger.
        tokenizer: the prompt tokenizer.

    Raises:
        ValueError: two embeddings share a trigger, or a trigger is already one token of the vocabulary (a
            word like "cat" would silently stop meaning itself; diffusers refuses such tokens too).
    """

    def __init__(self, embeddings: Sequence[Embedding], tokenizer: Tokenizer):
        self.embeddings = tuple(embeddings)
        self.tokenizer = tokenizer
        self.first_id = tokenizer.vocab_size
        self._ids: dict[str, list[int]] = {}
        for e in self.embeddings:
            if not isinstance(e, Embedding):
                raise ValueError(f"embeddings must be Embedding objects (see load_embedding), got {type(e).__name__}")
            key = e.trigger.lower()
            if key in self._ids:
                raise ValueError(f"two embeddings have the trigger {e.trigger!r}; load one with another trigger=")
            known = tokenizer.encode(e.trigger)
            if len(known) == 1:
                raise ValueError(f"trigger {e.trigger!r} is already a token of the vocabulary (id {known[0]}); "
                                 "load the embedding with another trigger=")  # fmt: skip
            start = self.first_id + sum(map(len, self._ids.values()))
            self._ids[key] = list(range(start, start + e.count))
        words = sorted(self._ids, key=len, reverse=True)  # the longest trigger wins where two overlap
        self._pattern = re.compile("|".join(map(_word_pattern, words)), re.IGNORECASE) if words else None

    def __bool__(self) -> bool:
        return bool(self.embeddings)

    def encode(self, text: str) -> list[list[int]]:
        """`text`'s token ids with each trigger replaced by its placeholder ids, as units a chunk keeps whole:
        `[id]` for a token, the n ids of an embedding together."""
        units: list[list[int]] = []
        start = 0
        for m in self._pattern.finditer(text) if self._pattern else ():
            units += [[t] for t in self.tokenizer.encode(text[start : m.start()])]
            units.append(self._ids[m.group(0).lower()])
            start = m.end()
        return units + [[t] for t in self.tokenizer.encode(text[start:])]

    def vectors(self, encoder: TextTransformer, tower: int = 0, towers: int = 1) -> Tensor | None:
        """The placeholder vectors, (X, D), for text tower `tower` of a pipeline's `towers`; None without
        embeddings.

        Raises:
            ValueError: an embedding was made for another model (its tower count or width differs).
        """
        if not self.embeddings:
            return None
        if encoder.token_embed.num_embeddings != self.first_id:
            raise ValueError(f"the text tower has {encoder.token_embed.num_embeddings} token embeddings and the "
                             f"tokenizer {self.first_id} tokens; textual inversion needs them equal")  # fmt: skip
        rows = []
        for e in self.embeddings:
            if len(e.vectors) != towers:
                kind = "an SDXL embedding (clip_l, clip_g)" if len(e.vectors) == 2 else "an SD 1.x/2.x embedding"
                raise ValueError(f"embedding {e.trigger!r} is {kind} with vectors for {len(e.vectors)} text "
                                 f"tower(s); this pipeline has {towers}")  # fmt: skip
            width = e.vectors[tower].shape[1]
            if width != encoder.config.width:
                raise ValueError(f"embedding {e.trigger!r} has vectors of width {width}; text tower {tower + 1} "
                                 f"has width {encoder.config.width}")  # fmt: skip
            rows.append(e.vectors[tower].to(encoder.token_embed.weight))
        return torch.cat(rows)  # (X, D)
