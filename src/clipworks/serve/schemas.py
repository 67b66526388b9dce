"""The JSON bodies of the search service's API (they make its OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TextSearchRequest", "EmbedRequest", "Result", "SearchResponse", "EmbedResponse", "HealthResponse",
           "ErrorResponse"]


class TextSearchRequest(BaseModel):
    """A text-to-image search."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: str = Field(description="what to look for, in words")
    k: int | None = Field(None, description="how many results: 1 to the server's max_k (default 10)")


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


class SearchResponse(BaseModel):
    """Results, best first."""

    results: list[Result]


class EmbedResponse(BaseModel):
    """A unit-norm embedding in the model's shared image-text space."""

    model: str
    modality: str = Field(description='"text" or "image"')
    embedding: list[float]


class HealthResponse(BaseModel):
    """What the server holds and accepts."""

    status: str
    model: str
    dim: int
    images: int = Field(description="vectors in the image index")
    captions: int | None = Field(description="vectors in the caption bank, or null without one")
    max_k: int
    max_body_bytes: int
    allow_urls: bool
    int8: bool = Field(description="whether the model runs with int8 matrix products (`serve --int8`)")


class ErrorResponse(BaseModel):
    """Every refused request answers this body."""

    error: str
