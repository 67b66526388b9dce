"""A Chroma `EmbeddingFunction` of CLIP: documents and images (numpy arrays) in one collection, batched."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

try:
    from chromadb.api.types import Embeddable, EmbeddingFunction, Embeddings, Space
except ImportError as e:
    raise ImportError("clipworks.integrations.chroma needs chromadb: pip install 'clipworks[chroma]'") from e

from .core import Embedder, create_embedder

__all__ = ["ClipworksEmbeddingFunction"]


class ClipworksEmbeddingFunction(EmbeddingFunction[Embeddable]):
    """Unit-norm CLIP embeddings of Chroma documents (str) and images ((H, W, 3) arrays of 0-255 values).

    A mixed input is split into its texts and its images, each embedded in batches (not one model call per item),
    and the rows come back in input order. Built from a model name or a service, the function has a config
    Chroma stores with the collection and rebuilds it from (sharing the loaded model, not loading it again); one
    built from a model object has none (Chroma then treats it as a legacy function).

    Args:
        model_name: see `clipworks.integrations.core.create_embedder`, which takes the other keywords too
            (pretrained, model/preprocess/tokenizer, base_url, device, batch_size, the service's options).
        embedder: an embedder built already, instead of those keywords.
    """

    def __init__(self, model_name: str | None = None, *, embedder: Embedder | None = None, **options: Any) -> None:
        if embedder is not None and (model_name is not None or options):
            raise ValueError("pass either embedder= or the keywords that build one, not both")
        self.embedder = embedder if embedder is not None else create_embedder(model_name, **options)
        self._config = None if embedder is not None or "model" in options else _config(model_name, options)

    def __call__(self, input: Embeddable) -> Embeddings:
        texts = [i for i, item in enumerate(input) if isinstance(item, str)]
        images = [i for i, item in enumerate(input) if not isinstance(item, str)]
        rows: list = [None] * len(input)
        if texts:
            for i, row in zip(texts, self.embedder.text([input[i] for i in texts])):
                rows[i] = row
        if images:
            for i, row in zip(images, self.embedder.image([_image(input[i], i) for i in images])):
                rows[i] = row
        return [np.asarray(row, dtype=np.float32) for row in rows]

    @staticmethod
    def name() -> str:
        return "clipworks"

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> List[Space]:
        return ["cosine", "ip", "l2"]  # unit-norm rows: all three rank alike

    def get_config(self) -> Dict[str, Any]:
        return NotImplemented if self._config is None else dict(self._config)

    @staticmethod
    def build_from_config(config: Dict[str, Any]) -> ClipworksEmbeddingFunction:
        return ClipworksEmbeddingFunction(**{k: v for k, v in config.items() if v is not None})

    def validate_config_update(self, old_config: Dict[str, Any], new_config: Dict[str, Any]) -> None:
        changed = sorted(k for k in ("model_name", "pretrained", "base_url") if k in new_config
                         and new_config[k] != old_config.get(k))  # fmt: skip
        if changed:
            raise ValueError(f"{changed} cannot change: the collection's vectors were made by the old model")


def _config(model_name: str | None, options: Dict[str, Any]) -> Dict[str, Any]:
    config = {"model_name": model_name, **{k: options.get(k) for k in ("pretrained", "base_url", "device")}}
    if options.get("batch_size") is not None:
        config["batch_size"] = options["batch_size"]
    if config["pretrained"] is not None:
        config["pretrained"] = str(config["pretrained"])
    return config


def _image(item: Any, index: int) -> Any:
    if isinstance(item, np.ndarray):
        return item
    raise ValueError(f"input {index} is a {type(item).__name__}: Chroma's inputs are str documents or numpy "
                     "image arrays")  # fmt: skip
