"""A LangChain `Embeddings` of CLIP: texts in batches, and images for LangChain's multimodal vector stores."""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

try:
    from langchain_core.embeddings import Embeddings
except ImportError as e:
    raise ImportError("clipworks.integrations.langchain needs langchain-core: "
                      "pip install 'clipworks[langchain]'") from e  # fmt: skip

from .core import Embedder, create_embedder

__all__ = ["ClipworksEmbeddings"]


class ClipworksEmbeddings(Embeddings):
    """Unit-norm CLIP embeddings for LangChain, each list embedded in batches (not one model call per text).

    Examples:
        `ClipworksEmbeddings("ViT-B-32", pretrained="laion2b_s34b_b79k")` (in-process),
        `ClipworksEmbeddings(base_url="http://127.0.0.1:8000")` (a `clipworks serve` service).

    Args:
        model_name: see `clipworks.integrations.core.create_embedder`, which takes the other keywords too
            (pretrained, model/preprocess/tokenizer, base_url, device, batch_size, the service's options).
        embedder: an embedder built already (shared between integrations), instead of those keywords.
    """

    def __init__(self, model_name: str | None = None, *, embedder: Embedder | None = None, **options: Any) -> None:
        if embedder is not None and (model_name is not None or options):
            raise ValueError("pass either embedder= or the keywords that build one, not both")
        self.embedder = embedder if embedder is not None else create_embedder(model_name, **options)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """The embeddings of `texts`, in order."""
        return self.embedder.text(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        """The embedding of one text (CLIP embeds queries and documents alike)."""
        return self.embedder.text([text])[0].tolist()

    def embed_image(self, uris: Sequence[Any]) -> list[list[float]]:
        """The embeddings of images: file paths (LangChain's `uris`), bytes, PIL images or arrays."""
        return self.embedder.image(list(uris)).tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """`embed_documents` in a worker thread."""
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        """`embed_query` in a worker thread."""
        return await asyncio.to_thread(self.embed_query, text)

    async def aembed_image(self, uris: Sequence[Any]) -> list[list[float]]:
        """`embed_image` in a worker thread."""
        return await asyncio.to_thread(self.embed_image, uris)
