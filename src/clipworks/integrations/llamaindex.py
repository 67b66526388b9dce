"""A LlamaIndex `MultiModalEmbedding` of CLIP: texts and images, each batch in one model call or request."""

from __future__ import annotations

import asyncio
from typing import Any, List

try:
    from llama_index.core.base.embeddings.base import Embedding
    from llama_index.core.bridge.pydantic import PrivateAttr
    from llama_index.core.constants import DEFAULT_EMBED_BATCH_SIZE
    from llama_index.core.embeddings import MultiModalEmbedding
    from llama_index.core.schema import ImageType
except ImportError as e:
    raise ImportError("clipworks.integrations.llamaindex needs llama-index-core: "
                      "pip install 'clipworks[llamaindex]'") from e  # fmt: skip

from .core import Embedder, create_embedder

__all__ = ["ClipworksEmbedding"]


class ClipworksEmbedding(MultiModalEmbedding):
    """Unit-norm CLIP embeddings of texts and images for LlamaIndex (e.g. `MultiModalVectorStoreIndex`).

    `get_text_embedding_batch` and `get_image_embedding_batch` embed each batch of `embed_batch_size` items in one
    model call (in-process) or one request (service). Images are file paths or file objects (LlamaIndex's
    `ImageType`), or bytes, PIL images and arrays.

    Args:
        model_name: see `clipworks.integrations.core.create_embedder`, which takes the other keywords too
            (pretrained, model/preprocess/tokenizer, base_url, device, batch_size, the service's options).
        embedder: an embedder built already, instead of those keywords.
        embed_batch_size: LlamaIndex's batch size (inputs per `_get_*_embeddings` call).
        callback_manager: LlamaIndex's callbacks.
    """

    _embedder: Any = PrivateAttr()

    def __init__(self, model_name: str | None = None, *, embedder: Embedder | None = None,
                 embed_batch_size: int = DEFAULT_EMBED_BATCH_SIZE, callback_manager: Any = None,
                 **options: Any) -> None:  # fmt: skip
        if embedder is not None and (model_name is not None or options):
            raise ValueError("pass either embedder= or the keywords that build one, not both")
        embedder = embedder if embedder is not None else create_embedder(model_name, **options)
        super().__init__(model_name=embedder.label, embed_batch_size=embed_batch_size,
                         callback_manager=callback_manager)  # fmt: skip
        self._embedder = embedder

    @classmethod
    def class_name(cls) -> str:
        return "ClipworksEmbedding"

    @property
    def embedder(self) -> Embedder:
        """The embedder that does the work."""
        return self._embedder

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embedder.text([query])[0].tolist()

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embedder.text([text])[0].tolist()

    def _get_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return self._embedder.text(texts).tolist()

    def _get_image_embedding(self, img_file_path: ImageType) -> Embedding:
        return self._embedder.image([img_file_path])[0].tolist()

    def _get_image_embeddings(self, img_file_paths: List[ImageType]) -> List[Embedding]:
        return self._embedder.image(img_file_paths).tolist()

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    async def _aget_image_embedding(self, img_file_path: ImageType) -> Embedding:
        return await asyncio.to_thread(self._get_image_embedding, img_file_path)

    async def _aget_image_embeddings(self, img_file_paths: List[ImageType]) -> List[Embedding]:
        return await asyncio.to_thread(self._get_image_embeddings, img_file_paths)
