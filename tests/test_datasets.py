"""Tests for the training data sources: specs, csv/tsv, folders, WebDataset shards, synthetic, loaders."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

import clipworks
from clipworks.config import PreprocessConfig
from clipworks.data.datasets import (
    Batch,
    DataSpec,
    ShardError,
    build_dataset,
    collate,
    expand_braces,
    make_loader,
    parse_data_spec,
    set_epoch,
)
from clipworks.transforms import image_transform

SIZE = 16
TRANSFORM = image_transform(PreprocessConfig(image_size=SIZE))


@pytest.fixture(scope="module")
def tokenizer():
    return clipworks.get_tokenizer("ViT-B-32")


def _image_bytes(i: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12 + i % 5, 10), ((37 * i) % 256, (11 * i) % 256, 200)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def table(tmp_path):
    """A csv of 10 rows under images/: row 3 is a broken image, row 6 has an empty caption."""
    (tmp_path / "images").mkdir()
    rows = ["filepath,caption"]
    for i in range(10):
        name = f"images/{i}.{'jpg' if i % 2 else 'png'}"
        data = b"not an image" if i == 3 else _image_bytes(i, "JPEG" if i % 2 else "PNG")
        (tmp_path / name).write_bytes(data)
        rows.append(f"{name},{'' if i == 6 else f'caption {i}'}")
    path = tmp_path / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _write_shard(path: Path, start: int, count: int, broken=()) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            files = {f"{i:05d}.jpg" if i % 2 else f"{i:05d}.png": b"junk" if i in broken else _image_bytes(i)}
            if i % 3:
                files[f"{i:05d}.txt"] = f"caption {i}".encode()
            else:
                files[f"{i:05d}.json"] = json.dumps({"caption": f"caption {i}", "id": i}).encode()
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    """3 shards of 8 samples each (captions 0..23); sample 5 is a broken image."""
    for s in range(3):
        _write_shard(tmp_path / f"shard-{s:06d}.tar", 8 * s, 8, broken={5})
    return f"wds:{tmp_path}/shard-{{000000..000002}}.tar"


def _captions(loader) -> tuple[list[str], int]:
    captions, skipped = [], 0
    for batch in loader:
        captions += [f"caption {t}" for t in _decode_ids(batch)]
        skipped += batch.skipped
    return captions, skipped


def _decode_ids(batch: Batch) -> list[int]:
    # every caption is "caption N"; the token table maps its ids back to N
    return [int(_TOKEN_TO_TEXT[tuple(row[row > 0].tolist())]) for row in batch.tokens]


_TOKEN_TO_TEXT: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _token_table(tokenizer):
    tokens = tokenizer([f"caption {i}" for i in range(100)])
    for i, row in enumerate(tokens):
        _TOKEN_TO_TEXT[tuple(row[row > 0].tolist())] = i


def test_parse_data_spec():
    assert parse_data_spec("csv:a/b.csv") == DataSpec("csv", "a/b.csv", (("caption", "caption"), ("image", "filepath")))
    spec = parse_data_spec("tsv:x.tsv?image=path&caption=text")
    assert (spec.option("image"), spec.option("caption")) == ("path", "text")
    assert parse_data_spec("synthetic:shapes?size=5").option("size") == "5"
    with pytest.raises(ValueError, match="csv, tsv, folder, wds, synthetic"):
        parse_data_spec("s3:bucket")
    with pytest.raises(ValueError, match="csv, tsv, folder, wds, synthetic"):
        parse_data_spec("no-scheme")
    with pytest.raises(ValueError, match="image=.*caption="):
        parse_data_spec("csv:x.csv?img=a")
    with pytest.raises(ValueError, match="unknown generator 'cats'.*shapes"):
        parse_data_spec("synthetic:cats")
    with pytest.raises(ValueError, match="no path"):
        parse_data_spec("folder:")


def test_expand_braces():
    assert expand_braces("s-{000008..000010}.tar") == ["s-000008.tar", "s-000009.tar", "s-000010.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_braces("s-{1..2.tar")


def test_nonexistent_paths(tmp_path):
    for spec in (f"csv:{tmp_path}/none.csv", f"folder:{tmp_path}/none", f"wds:{tmp_path}/s-{{0..1}}.tar"):
        with pytest.raises(FileNotFoundError, match="none|s-0.tar"):
            build_dataset(spec, TRANSFORM)


def test_csv_samples_and_skips(table, tokenizer):
    dataset = build_dataset(f"csv:{table}", TRANSFORM)
    assert len(dataset) == 10
    image, caption = dataset[0]
    assert image.shape == (3, SIZE, SIZE) and caption == "caption 0"
    assert dataset[3] is None and dataset[6] is None  # broken image, empty caption
    loader = make_loader(f"csv:{table}", TRANSFORM, tokenizer, batch_size=4, workers=0, drop_last=False)
    captions, skipped = _captions(loader)
    assert sorted(captions) == sorted(f"caption {i}" for i in range(10) if i not in (3, 6))
    assert skipped == 2


def test_tsv_column_names(tmp_path, table):
    (tmp_path / "renamed.tsv").write_text("path\ttext\nimages/0.png\thello\n")
    dataset = build_dataset(f"tsv:{tmp_path}/renamed.tsv?image=path&caption=text", TRANSFORM)
    assert dataset[0][1] == "hello"
    with pytest.raises(ValueError, match=r"columns found: \['path', 'text'\]"):
        build_dataset(f"tsv:{tmp_path}/renamed.tsv", TRANSFORM)


def test_folder(tmp_path):
    for i, sub in enumerate(["", "a", "a/b"]):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / f"img{i}.png").write_bytes(_image_bytes(i))
        (tmp_path / sub / f"img{i}.txt").write_text(f"caption {i}\n")
    (tmp_path / "a" / "lonely.jpg").write_bytes(_image_bytes(9, "JPEG"))
    with pytest.warns(UserWarning, match="1 images have no .txt caption"):
        dataset = build_dataset(f"folder:{tmp_path}", TRANSFORM)
    assert sorted(dataset[i][1] for i in range(len(dataset))) == ["caption 0", "caption 1", "caption 2"]
    assert [p.name for p in dataset.uncaptioned] == ["lonely.jpg"]


def test_wds_samples_and_skips(shards, tokenizer):
    loader = make_loader(shards, TRANSFORM, tokenizer, batch_size=5, workers=0, drop_last=False)
    captions, skipped = _captions(loader)
    assert Counter(captions) == Counter(f"caption {i}" for i in range(24) if i != 5)
    assert skipped == 1


def test_wds_split_across_ranks_and_workers(shards):
    dataset = build_dataset(shards, TRANSFORM, rank=0, world_size=2)
    parts = [
        build_dataset(shards, TRANSFORM, rank=r, world_size=2).worker_shards(epoch, w, 2)
        for epoch in (0, 1)
        for r in range(2)
        for w in range(2)
    ]
    for epoch in range(2):
        assigned = [s for part in parts[4 * epoch : 4 * epoch + 4] for s in part]
        assert sorted(assigned) == sorted(dataset.shards)  # every shard exactly once per epoch
    assert parts[:4] != parts[4:]  # reshuffled between epochs


def test_deterministic_order(table, shards, tokenizer):
    for spec in (f"csv:{table}", shards):
        runs = [
            _captions(make_loader(spec, TRANSFORM, tokenizer, batch_size=3, workers=0, seed=7, epoch=e))[0]
            for e in (0, 0, 1)
        ]
        assert runs[0] == runs[1] and runs[0] != runs[2], spec


def test_start_step_resumes(table, shards, tokenizer):
    for spec, world, batch_size in ((f"csv:{table}", 2, 1), (shards, 1, 2)):
        kwargs = {"batch_size": batch_size, "workers": 0, "seed": 3, "epoch": 1, "world_size": world, "rank": world - 1}
        full = [b.tokens for b in make_loader(spec, TRANSFORM, tokenizer, **kwargs)]
        resumed = [b.tokens for b in make_loader(spec, TRANSFORM, tokenizer, start_step=2, **kwargs)]
        assert len(full) > 2 and len(resumed) == len(full) - 2
        assert all(torch.equal(a, b) for a, b in zip(full[2:], resumed))


def test_map_style_ranks_partition(table, tokenizer):
    seen = []
    for rank in range(2):
        loader = make_loader(f"csv:{table}", TRANSFORM, tokenizer, batch_size=1, workers=0, rank=rank, world_size=2)
        seen += _captions(loader)[0]
        assert len(loader) == 5
    assert sorted(seen) == sorted(f"caption {i}" for i in range(10) if i not in (3, 6))


def test_mostly_failing_shard_names_shard(tmp_path, tokenizer):
    _write_shard(tmp_path / "good.tar", 0, 8)
    _write_shard(tmp_path / "bad.tar", 100, 24, broken=set(range(100, 115)))
    loader = make_loader(f"wds:{tmp_path}/{{good,bad}}.tar", TRANSFORM, tokenizer, batch_size=4, workers=0)
    with pytest.raises(ShardError, match=r"bad\.tar: 15 of 24 samples failed"):
        list(loader)


def test_unreadable_shard_names_shard(tmp_path, tokenizer):
    (tmp_path / "junk.tar").write_bytes(b"definitely not a tar file" * 40)
    with pytest.raises(ShardError, match=r"junk\.tar: not readable as a tar file"):
        list(make_loader(f"wds:{tmp_path}/junk.tar", TRANSFORM, tokenizer, batch_size=4, workers=0))


def test_collate_counts_and_pickles(tokenizer):
    import pickle

    fn = pickle.loads(pickle.dumps(collate(tokenizer)))
    batch = fn([(torch.zeros(3, 4, 4), "a"), None, (torch.ones(3, 4, 4), "b"), None])
    assert batch.images.shape == (2, 3, 4, 4) and batch.tokens.shape == (2, 77) and batch.skipped == 2
    empty = fn([None, None])
    assert empty.images.shape[0] == 0 and empty.tokens.shape == (0, 77) and empty.skipped == 2


def test_workers_two_ranks(shards, tokenizer):
    """2 ranks x 2 workers cover every sample exactly once per epoch; persistent workers follow set_epoch."""
    per_epoch = []
    loaders = [
        make_loader(shards, TRANSFORM, tokenizer, batch_size=2, workers=2, rank=r, world_size=2, drop_last=False)
        for r in range(2)
    ]
    for epoch in range(2):
        captions, skipped = [], 0
        for loader in loaders:
            set_epoch(loader, epoch)
            c, s = _captions(loader)
            captions, skipped = captions + c, skipped + s
        assert Counter(captions) == Counter(f"caption {i}" for i in range(24) if i != 5)
        assert skipped == 1
        per_epoch.append(captions)
    assert per_epoch[0] != per_epoch[1]

    full = [b.tokens for b in loaders[0]]  # epoch 1 again; rank 0 has 2 shards, one per worker
    resumed = make_loader(shards, TRANSFORM, tokenizer, batch_size=2, workers=2, rank=0, world_size=2,
                          drop_last=False, epoch=1, start_step=3)  # fmt: skip
    assert [b.tokens.tolist() for b in resumed] == [t.tolist() for t in full[3:]]


def test_shard_error_from_worker(tmp_path, tokenizer):
    _write_shard(tmp_path / "bad.tar", 100, 24, broken=set(range(100, 115)))
    # one worker: torch waits ~5 s per worker to shut a loader down after a worker raised
    loader = make_loader(f"wds:{tmp_path}/bad.tar", TRANSFORM, tokenizer, batch_size=4, workers=1)
    with pytest.raises(ShardError, match=r"bad\.tar: 15 of 24 samples failed"):
        list(loader)


def test_synthetic(tokenizer):
    pytest.importorskip("clipworks.data.synthetic")
    dataset = build_dataset("synthetic:shapes?size=6&seed=1&image_size=32", TRANSFORM)
    assert len(dataset) == 6
    image, caption = dataset[0]
    assert image.shape == (3, SIZE, SIZE) and isinstance(caption, str) and caption
    batch = next(iter(make_loader("synthetic:shapes?size=6", TRANSFORM, tokenizer, batch_size=3, workers=0)))
    assert batch.images.shape == (3, 3, SIZE, SIZE) and batch.skipped == 0
