"""The safety filter: hides results that a concept list flags, by zero-shot classification of the stored embeddings.

Each result's vector is compared with the text embeddings of the unsafe concepts and of neutral ones; the
probability of "unsafe" is the summed softmax weight of the unsafe concepts over both lists, with the model's
own logit scale (100 for trained CLIP models), and a result at or above the threshold (default 0.5) is hidden.
Comparing against neutral concepts, rather than cutting a raw cosine, keeps one threshold meaningful across
models whose cosines sit at different heights. The lists and the threshold are the server's (`serve
--safety-concepts FILE --safety-threshold P`); requests switch the filter off with `safe: false`.

The default lists are written for photographs; they were not calibrated on labelled data here (no such data
ships with clipworks): measure the filter on a sample of your collection before relying on it.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["SafetyConcepts", "SafetyFilter", "DEFAULT_THRESHOLD", "load_concepts"]

DEFAULT_THRESHOLD = 0.5
DEFAULT_UNSAFE = ("nudity", "a naked person", "sexual activity", "pornography", "exposed genitals",
                  "graphic violence", "gore", "a bloody wound", "a dead body", "a mutilated body")  # fmt: skip
DEFAULT_NEUTRAL = ("a photo", "a person", "people", "a clothed person", "a person in a swimsuit", "a portrait",
                   "an animal", "a landscape", "a building", "a city street", "food", "an object", "a product",
                   "a vehicle", "a plant", "a drawing", "a painting", "text", "a screenshot", "a logo",
                   "red paint", "a medical illustration")  # fmt: skip
TEMPLATE = "a photo of {}"


@dataclass(frozen=True)
class SafetyConcepts:
    """The concept lists and the threshold of a safety filter."""

    unsafe: tuple[str, ...] = DEFAULT_UNSAFE
    neutral: tuple[str, ...] = DEFAULT_NEUTRAL
    threshold: float = DEFAULT_THRESHOLD
    template: str = TEMPLATE

    def __post_init__(self) -> None:
        if not self.unsafe or not self.neutral:
            raise ValueError("a safety filter needs at least one unsafe and one neutral concept")
        if not 0 < self.threshold < 1:
            raise ValueError(f"safety threshold {self.threshold}: expected a probability in (0, 1)")
        if "{}" not in self.template:
            raise ValueError(f"safety template {self.template!r}: expected a {{}} for the concept")


def load_concepts(path: str | os.PathLike, threshold: float = DEFAULT_THRESHOLD) -> SafetyConcepts:
    """Concepts from a JSON file `{"unsafe": [...], "neutral": [...], "template": "a photo of {}"}` (neutral and
    template optional: the defaults), or a text file of unsafe concepts, one per line (# starts a comment).

    Raises:
        ValueError: an unreadable file, or lists that are not lists of non-empty strings.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the safety concepts ({e.strerror or e})") from e
    if path.suffix.lower() == ".json":
        try:
            spec = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(spec, dict) or set(spec) - {"unsafe", "neutral", "template"}:
            raise ValueError(f"{path}: expected an object with \"unsafe\" (and optionally \"neutral\", \"template\")")
        lists = {name: spec.get(name, getattr(SafetyConcepts, name)) for name in ("unsafe", "neutral")}
        for name, values in lists.items():
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in values):
                raise ValueError(f"{path}: \"{name}\" must be a list of non-empty strings")
        return SafetyConcepts(tuple(lists["unsafe"]), tuple(lists["neutral"]), threshold,
                              spec.get("template", TEMPLATE))  # fmt: skip
    unsafe = tuple(line.split("#")[0].strip() for line in text.splitlines())
    return SafetyConcepts(tuple(u for u in unsafe if u), threshold=threshold)


@dataclass
class SafetyFilter:
    """A `SafetyConcepts` bound to the models of a server: `unsafe(encoder, vectors)` flags vectors. The concept
    embeddings of each model are computed once, on first use."""

    concepts: SafetyConcepts = field(default_factory=SafetyConcepts)
    _cache: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def concept_features(self, encoder) -> tuple[np.ndarray, float]:
        """(C, D) unit-norm features of the unsafe concepts followed by the neutral ones, and the logit scale."""
        with self._lock:
            if id(encoder) not in self._cache:
                c = self.concepts
                texts = [c.template.format(t) for t in c.unsafe + c.neutral]
                self._cache[id(encoder)] = (encoder.text(texts), encoder.logit_scale())
            return self._cache[id(encoder)]

    def probabilities(self, encoder, vectors: np.ndarray) -> np.ndarray:
        """P(unsafe) of each of the (N, D) vectors."""
        features, scale = self.concept_features(encoder)
        logits = scale * (np.asarray(vectors, dtype=np.float32) @ features.T)  # (N, C)
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        weights /= weights.sum(axis=1, keepdims=True)
        return weights[:, : len(self.concepts.unsafe)].sum(axis=1)

    def unsafe(self, encoder, vectors: np.ndarray) -> np.ndarray:
        """True for the vectors the filter hides."""
        return self.probabilities(encoder, vectors) >= self.concepts.threshold
