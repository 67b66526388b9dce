"""CLIP embeddings for LangChain, LlamaIndex and Chroma, run in-process or by a clipworks service.

Each framework's class lives in its own module, imported only when named here (nothing heavy is imported by
`import clipworks.integrations`):

- `ClipworksEmbeddings` (`clipworks.integrations.langchain`): a `langchain_core.embeddings.Embeddings`.
- `ClipworksEmbedding` (`clipworks.integrations.llamaindex`): a LlamaIndex `MultiModalEmbedding`.
- `ClipworksEmbeddingFunction` (`clipworks.integrations.chroma`): a Chroma `EmbeddingFunction` of texts and images.

All three take the keywords of `clipworks.integrations.core.create_embedder`, or a built `embedder=`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClipworksEmbeddings": ".langchain",
    "ClipworksEmbedding": ".llamaindex",
    "ClipworksEmbeddingFunction": ".chroma",
    **dict.fromkeys(("create_embedder", "LocalEmbedder", "ServiceEmbedder", "ServiceError"), ".core"),
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipworks.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
