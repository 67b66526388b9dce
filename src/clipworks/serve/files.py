"""Serving a collection's image files: only real files under the collection's roots, only image types."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .limits import ServeError

__all__ = ["IMAGE_TYPES", "collection_roots", "open_image_file", "resolve_image_file"]

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


def open_image_file(path: str | None, roots: tuple[Path, ...]) -> tuple[BinaryIO, str, int]:
    """(open file, media type, size) of an indexed image file that may be served.

    `resolve_image_file` checks the path; the file is then opened without following a symlink in its last
    component, and what was actually opened is checked again (on Linux through /proc/self/fd, elsewhere by
    comparing device and inode with the checked path), so a symlink swapped into the collection between the
    check and the open cannot lead outside the roots.

    Raises:
        ServeError: as `resolve_image_file`; 403 when the file changed into a link to outside the roots.
    """
    real, media_type = resolve_image_file(path, roots)
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ServeError(403, "the image file changed into a symbolic link") from None
        raise ServeError(404, "the image file is missing") from None
    try:
        info = os.fstat(fd)
        opened = _opened_path(fd)
        if opened is not None:
            inside = any(opened.is_relative_to(root) for root in roots)
        else:
            checked = os.stat(real)
            inside = (checked.st_dev, checked.st_ino) == (info.st_dev, info.st_ino)
        if not inside:
            raise ServeError(403, "the image file lies outside the collection's roots")
        if not stat.S_ISREG(info.st_mode):
            raise ServeError(404, "the image file is missing")
        return os.fdopen(fd, "rb"), media_type, info.st_size
    except BaseException:
        os.close(fd)
        raise


def _opened_path(fd: int) -> Path | None:
    """The path the kernel holds for an open file (Linux), or None where that cannot be read."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None

