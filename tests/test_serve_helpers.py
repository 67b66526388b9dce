"""Fixtures for the search-service tests: a tiny random CLIP, a few images, their index and a caption bank.

(No tests here; `test_serve*.py` modules import these fixtures.)
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "black": (10, 10, 10), "white": (245, 245, 245)}  # fmt: skip
CAPTIONS = ["a red square", "a green square", "a blue square", "a yellow square", "a black square", "a white square"]


@dataclass
class Collection:
    """Everything a test needs to build the app: the model parts, the indexes and the files."""

    model: object
    preprocess: object
    tokenizer: object
    index: object
    captions: object
    images: Path
    outside: Path
    root: Path


def tiny_model():
    """A tiny random ViT CLIP (32 px images) with its eval transform and tokenizer."""
    import torch
    from reference import tiny_config

    import clipworks
    from clipworks.presets import get_preset

    torch.manual_seed(0)
    cfg = tiny_config(get_preset("ViT-B-32"))
    model, _, preprocess = clipworks.create_model_and_transforms(cfg)
    return model, preprocess, clipworks.get_tokenizer(cfg)


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (40, 40)) -> bytes:
    """A solid-colour PNG file's bytes."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_records(images: Path, outside: Path) -> list[dict]:
    records = []
    for name, colour in COLOURS.items():
        (images / f"{name}.png").write_bytes(png_bytes(colour))
        records.append({"key": name, "path": str(images / f"{name}.png"), "caption": f"a {name} square"})
    (outside / "secret.png").write_bytes(png_bytes((1, 2, 3)))
    (outside / "secret.txt").write_text("secret")
    (images / "notes.txt").write_text("not an image")
    os.symlink(outside / "secret.png", images / "escape.png")  # a link from inside the root to outside it
    return records + [
        {"key": "sub/dir key", "path": str(images / "red.png"), "caption": None},  # a key with a slash and space
        {"key": "escape", "path": str(images / "escape.png"), "caption": None},
        {"key": "dotdot", "path": str(images / ".." / "outside" / "secret.png"), "caption": None},
        {"key": "outside", "path": str(outside / "secret.png"), "caption": None},
        {"key": "notes", "path": str(images / "notes.txt"), "caption": None},
        {"key": "missing", "path": str(images / "gone.png"), "caption": None},
        {"key": "nofile", "path": None, "caption": "a key with no image file"},
    ]


def build_collection(root: Path) -> Collection:
    """Images under `root/images` (plus files outside it), embedded with the tiny model and indexed."""
    from clipworks.data.decode import load_image
    from clipworks.search.index import build_index
    from clipworks.search.store import write_embeddings
    from clipworks.serve.service import Encoder

    model, preprocess, tokenizer = tiny_model()
    images, outside = root / "images", root / "outside"
    images.mkdir()
    outside.mkdir()
    records = _image_records(images, outside)
    encoder = Encoder(model, preprocess, tokenizer)
    readable = [r["path"] if r["path"] and Path(r["path"]).suffix == ".png" and Path(r["path"]).is_file() else None
                for r in records]  # fmt: skip
    pixels = [load_image(p) if p else Image.new("RGB", (8, 8)) for p in readable]
    write_embeddings(root / "emb", encoder.image(pixels), records, model="tiny", roots=[str(images)])
    index = build_index(root / "emb", root / "index", kind="flat")
    caption_records = [{"key": f"c{i}", "caption": c, "path": str(images / f"{colour}.png")}  # as `embed --text`
                       for i, (c, colour) in enumerate(zip(CAPTIONS, COLOURS))]  # fmt: skip
    write_embeddings(root / "cap-emb", encoder.text(CAPTIONS), caption_records, model="tiny", modality="text")
    captions = build_index(root / "cap-emb", root / "captions", kind="flat")
    return Collection(model, preprocess, tokenizer, index, captions, images, outside, root)


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Collection:
    """A collection built once per test module."""
    return build_collection(tmp_path_factory.mktemp("collection"))


def make_app(c: Collection, captions: bool = True, **settings):
    """The app over a collection, with `ServeSettings(**settings)`."""
    from clipworks.serve.app import create_app
    from clipworks.serve.limits import ServeSettings

    return create_app(c.index, c.model, c.preprocess, c.tokenizer, ServeSettings(**settings),
                      captions=c.captions if captions else None)  # fmt: skip


def brute_force(vectors: np.ndarray, query: np.ndarray, keys: list[str], k: int) -> list[str]:
    """The keys of the `k` rows with the highest inner product with `query` (ties by row order)."""
    scores = vectors @ query.reshape(-1)
    order = sorted(range(len(keys)), key=lambda i: (-scores[i], i))
    return [keys[i] for i in order[:k]]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app):
    """`app` served by uvicorn on a free loopback port in a thread; yields its base URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
