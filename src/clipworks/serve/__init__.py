"""The search service: an HTTP API and a web page over a `clipworks.search` index."""

from __future__ import annotations

__all__ = ["create_app", "ServeSettings"]


def __getattr__(name: str):
    # Lazy, so that `clipworks` builds its command line without importing FastAPI.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServeSettings":
        from .limits import ServeSettings

        return ServeSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
