"""The JSON bodies of the search service's API (they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SearchOptionsModel", "TextSearchRequest", "VectorSearchRequest", "EmbedRequest", "Result",
           "SearchResponse", "CollectionInfo", "CollectionsResponse", "EmbedResponse", "HealthResponse", "ErrorResponse"]


class SearchOptionsModel(BaseModel):
    """What every search request may add to its query."""

    model_config = ConfigDict(extra="forbid", strict=True)

    k: int | None = Field(None, description="how many results: 1 to the server's max_k (default 10)")
    collection: str | None = Field(None, description="the collection to search (default: the server's first)")
    filters: dict[str, Any] | str | None = Field(
        None, description='metadata conditions, applied inside the search: {"source": "laion", "aesthetic": '
                          '{"gte": 5}, "year": {"in": [2020, 2021]}} or the string "source=laion;aesthetic>=5"')
    offset: int | None = Field(None, description="results of the ranking to skip (load more); offset + k <= max_depth")
    dedup: bool | float | None = Field(None, description="drop near-duplicate results: true (cosine 0.95) or a "
                                                          "cosine threshold")  # fmt: skip
    safe: bool | None = Field(None, description="hide results the safety filter flags (default true, when the "
                                                "server has one)")  # fmt: skip
    aesthetic_weight: float | None = Field(None, description="rank by cosine + weight * aesthetic / 10 (collections "
                                                             "with aesthetic scores)")  # fmt: skip
    min_aesthetic: float | None = Field(None, description="only results whose aesthetic score is at least this")


class TextSearchRequest(SearchOptionsModel):
    """A text-to-image search."""

    query: str = Field(description="what to look for, in words")


class VectorSearchRequest(SearchOptionsModel):
    """A search by a raw embedding (any vector of the collection's size; it is normalised)."""

    vector: list[float] = Field(description="the query embedding, as many values as the collection's dim")


class EmbedRequest(BaseModel):
    """An embedding request as JSON (an image upload goes as multipart/form-data, field `file`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | None = Field(None, description="a text to embed")
    url: str | None = Field(None, description="an image to fetch and embed (servers started with --allow-urls)")


class Result(BaseModel):
    """One search result."""

    key: str = Field(description="the item's key in the index")
    score: float = Field(description="cosine similarity to the query, in [-1, 1]")
    caption: str | None = Field(None, description="the item's caption, if it has one")
    image: str | None = Field(None, description="URL of the item's image on this server, if it has one")
    full_image: str | None = Field(None, description="URL of the item's full-size image file, if it has one")
    aesthetic: float | None = Field(None, description="the item's aesthetic score, when the collection has them")
    metadata: dict[str, Any] = Field(default_factory=dict, description="the item's metadata columns")


class SearchResponse(BaseModel):
    """Results, best first."""

    collection: str | None = Field(None, description="the collection searched")
    results: list[Result]
    offset: int = Field(0, description="results of the ranking before this page")
    more: bool = Field(False, description="whether the ranking goes on past this page (ask with offset + k)")


class CollectionInfo(BaseModel):
    """A collection the server searches."""

    name: str
    model: str = Field(description="the model its vectors were embedded with")
    dim: int
    kind: str = Field(description="the store: flat, ivf, ivfpq, hnsw (FAISS), milvus or lancedb")
    modality: str = Field(description='what its vectors embed: "image", or "text" (a collection of captions)')
    images: int = Field(description="vectors in the collection")
    captions: int | None = Field(description="vectors in its caption bank, or null without one")
    columns: dict[str, str] = Field(description="metadata columns requests may filter on, with their kinds")
    aesthetic: bool = Field(description="whether its records carry aesthetic scores")
    default: bool = Field(description="whether requests that name no collection search it")


class CollectionsResponse(BaseModel):
    """The server's collections, the default first."""

    collections: list[CollectionInfo]


class EmbedResponse(BaseModel):
    """A unit-norm embedding in the model's shared image-text space."""

    model: str
    modality: str = Field(description='"text" or "image"')
    embedding: list[float]


class HealthResponse(BaseModel):
    """What the server holds and accepts."""

    status: str
    model: str = Field(description="the default collection's model (or the only model of an embeddings server)")
    dim: int
    images: int | None = Field(description="vectors in the default collection, or null without collections")
    captions: int | None = Field(description="vectors in the default collection's caption bank, or null")
    collections: list[str] = Field(description="the collections' names, the default first")
    models: list[str] = Field(description="the models the server runs (/v1/embeddings takes these names)")
    safety: bool = Field(description="whether results pass a safety filter unless a request says safe: false")
    max_k: int
    max_body_bytes: int
    allow_urls: bool
    int8: bool = Field(description="whether the model runs with int8 matrix products (`serve --int8`)")
    precision: str = Field("fp32", description="the default model's precision (`serve --precision`): fp32, bf16, fp16, "
                                               "pure_bf16, pure_fp16 or int8")


class ErrorResponse(BaseModel):
    """Every refused request answers this body."""

    error: str
