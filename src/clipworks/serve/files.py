"""Serving a collection's image files: only real files under the collection's roots, only image types."""

from __future__ import annotations

import os
from pathlib import Path

from .limits import ServeError

__all__ = ["IMAGE_TYPES", "collection_roots", "resolve_image_file"]

# Suffix -> media type. Only these are served, so a collection can never hand out an HTML or script file.
IMAGE_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif", ".webp": "image/webp",
    ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff", ".avif": "image/avif",
}  # fmt: skip


def collection_roots(explicit: tuple[Path, ...], manifest: dict) -> tuple[Path, ...]:
    """The real (symlink-free) folders images may be served from: `explicit` if given, else the manifest's
    "roots". Roots that do not exist are dropped; the filesystem root is refused as too broad.

    Raises:
        ValueError: a root is the filesystem root.
    """
    roots = explicit or tuple(Path(r) for r in manifest.get("roots") or ())
    real = []
    for root in roots:
        resolved = Path(os.path.realpath(root))
        if resolved == Path(resolved.anchor):
            raise ValueError(f"image root {str(root)!r} is the filesystem root; name the collection's own folder")
        if resolved.is_dir():
            real.append(resolved)
    return tuple(real)


def resolve_image_file(path: str | None, roots: tuple[Path, ...]) -> tuple[Path, str]:
    """(real path, media type) of an indexed image file that may be served.

    The path is resolved with every symlink followed, then must lie inside one of `roots` (themselves
    resolved): a `..` in a stored path or a symlink pointing out of the collection is refused.

    Raises:
        ServeError: 404 when there is no file, 403 when it lies outside the roots or is not an image type.
    """
    if not path:
        raise ServeError(404, "this key has no image file")
    if not roots:
        raise ServeError(404, "image files are not served: the index records no image roots (start the "
                              "server with --image-root)")  # fmt: skip
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(root) for root in roots):
        raise ServeError(403, "the image file lies outside the collection's roots")
    media_type = IMAGE_TYPES.get(real.suffix.lower())
    if media_type is None:
        raise ServeError(403, f"files of type {real.suffix or '(none)'!r} are not served")
    if not real.is_file():
        raise ServeError(404, "the image file is missing")
    return real, media_type
