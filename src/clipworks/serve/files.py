"""Serving a collection's image files: only real files under the collection's roots, only image types."""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from pathlib import Path
from typing import BinaryIO

from .limits import ServeError

__all__ = ["IMAGE_TYPES", "MAX_MEMBER_BYTES", "collection_roots", "open_image_file", "read_tar_member", "resolve_image_file"]

# Suffix -> media type. Only these are served, so a collection can never hand out an HTML or script file.
IMAGE_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif", ".webp": "image/webp",
    ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff", ".avif": "image/avif",
}  # fmt: skip

# Largest image served out of a tar (it is read into memory whole).
MAX_MEMBER_BYTES = 64 * 2**20


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


def resolve_image_file(path: str | None, roots: tuple[Path, ...], any_type: bool = False) -> tuple[Path, str | None]:
    """(real path, media type) of an indexed image file that may be served (with `any_type`, a file of any
    type, such as a WebDataset tar holding the image: the media type is then None).

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
    media_type = None if any_type else media_type_of(real.name)
    if not real.is_file():
        raise ServeError(404, "the image file is missing")
    return real, media_type


def media_type_of(name: str) -> str:
    """The media type of an image file name, or `ServeError(403)` for other types."""
    suffix = Path(name).suffix.lower()
    if suffix not in IMAGE_TYPES:
        raise ServeError(403, f"files of type {suffix or '(none)'!r} are not served")
    return IMAGE_TYPES[suffix]


def read_tar_member(path: str | None, member: str, roots: tuple[Path, ...]) -> tuple[bytes, str]:
    """(bytes, media type) of the image `member` of a WebDataset tar that may be served: the tar must lie
    inside `roots` (checked as `open_image_file` checks a file), the member must be an image type, a
    regular file, and at most `MAX_MEMBER_BYTES`.

    Raises:
        ServeError: 404 when the tar or member is missing or unreadable, 403 outside the roots or for other
            types, 413 for a member over the size cap.
    """
    media_type = media_type_of(member)
    real, _ = resolve_image_file(path, roots, any_type=True)
    file, _ = _open_checked(real, roots)
    with file:
        try:
            with tarfile.open(fileobj=file, mode="r:*") as archive:
                info = archive.getmember(member)
                if not info.isfile():
                    raise ServeError(404, "the image is not a file in its tar")
                if info.size > MAX_MEMBER_BYTES:
                    raise ServeError(413, f"the image is larger than {MAX_MEMBER_BYTES} bytes")
                return archive.extractfile(info).read(), media_type
        except KeyError:
            raise ServeError(404, "the image is missing from its tar") from None
        except (tarfile.TarError, EOFError, OSError):
            raise ServeError(404, "the image's tar is unreadable") from None


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
    file, size = _open_checked(real, roots)
    return file, media_type, size


def _open_checked(real: Path, roots: tuple[Path, ...]) -> tuple[BinaryIO, int]:
    """`real` (checked by `resolve_image_file`) opened for reading, refused unless what was opened is still a
    regular file inside `roots`."""
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
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


def _opened_path(fd: int) -> Path | None:
    """The path the kernel holds for an open file (Linux), or None where that cannot be read."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None
