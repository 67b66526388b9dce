"""clipworks embed / index / dedup: sources, broken inputs, resume, rank split, text, and the CLI end to end."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from reference import tiny_config

import clipworks
from clipworks.cli import main
from clipworks.data.decode import load_image
from clipworks.search.embed import embed_collection
from clipworks.search.index import load_index
from clipworks.search.store import read_embeddings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random ViT saved as a clipworks directory: (model, preprocess, tokenizer, local-dir spec)."""
    torch.manual_seed(0)
    model = clipworks.create_model(tiny_config(clipworks.get_preset("ViT-B-32")))
    path = tmp_path_factory.mktemp("model")
    clipworks.save_pretrained(model, path)
    model, _, preprocess = clipworks.create_model_and_transforms(f"local-dir:{path}")
    return model, preprocess, clipworks.get_tokenizer(model), f"local-dir:{path}"


def _photos(folder, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / ("nested" if i % 4 == 0 else "") / f"p{i:02d}.jpg"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30 + i, 44, 3), dtype=np.uint8)).save(p, quality=90)
        if i % 2 == 0:
            p.with_suffix(".txt").write_text(f"photo number {i}\n")
        paths.append(p)
    return paths


def _embed(tiny, data, out, **kw):
    model, preprocess, tokenizer, name = tiny
    kw.setdefault("workers", 0)
    return embed_collection(model, data, out, model_name=name, transform=preprocess, tokenizer=tokenizer,
                            batch_size=4, progress=False, **kw)  # fmt: skip


def test_folder_embed_matches_the_model_and_lists_broken_images(tiny, tmp_path):
    model, preprocess, _, name = tiny
    paths = _photos(tmp_path / "photos", 9)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    result = _embed(tiny, f"folder:{tmp_path / 'photos'}", tmp_path / "emb", shard_size=4, workers=2)
    assert (result.complete, result.embedded, result.skipped, result.shards_total) == (True, 9, 1, 3)
    x, records, manifest = read_embeddings(tmp_path / "emb")
    assert (manifest["model"], manifest["count"], manifest["dim"], manifest["dtype"]) == (name, 9, 24, "float16")
    assert manifest["roots"] == [str((tmp_path / "photos").resolve())] and manifest["skipped"] == 1
    assert "broken.jpg\tcannot read image" in (tmp_path / "emb" / "skipped.txt").read_text()
    by_key = {r["key"]: (r, v) for r, v in zip(records, x)}
    assert sorted(by_key) == sorted(p.relative_to(tmp_path / "photos").as_posix() for p in paths)
    rec, vec = by_key["nested/p04.jpg"]
    assert rec["caption"] == "photo number 4" and by_key["p01.jpg"][0]["caption"] is None
    assert rec["path"] == str(paths[4].resolve())
    with torch.no_grad():
        ref = model.encode_image(preprocess(load_image(paths[4]))[None], normalize=True)[0].numpy()
    np.testing.assert_allclose(vec, ref, atol=2e-3)  # stored as float16


def test_interrupted_embed_resumes_to_the_same_result(tiny, tmp_path):
    _photos(tmp_path / "photos", 11)
    data = f"folder:{tmp_path / 'photos'}"
    _embed(tiny, data, tmp_path / "whole", shard_size=3)

    def stop_after_two(shard: int) -> None:
        if shard == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _embed(tiny, data, tmp_path / "cut", shard_size=3, on_shard=stop_after_two)
    assert not (tmp_path / "cut" / "manifest.json").exists()
    with pytest.raises(ValueError, match="unfinished embed"):
        read_embeddings(tmp_path / "cut")
    resumed = _embed(tiny, data, tmp_path / "cut", shard_size=3)
    assert (resumed.shards_resumed, resumed.shards_written, resumed.embedded) == (2, 2, 5)
    for name in ("emb-000000.npy", "emb-000003.npy", "meta-000002.parquet"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    a, ra, _ = read_embeddings(tmp_path / "whole")
    b, rb, _ = read_embeddings(tmp_path / "cut")
    assert np.array_equal(a, b) and ra == rb
    with pytest.raises(ValueError, match="another job.*shard_size: 3 there, 5 now"):
        _embed(tiny, data, tmp_path / "cut", shard_size=5)


def test_ranks_split_shards(tiny, tmp_path, monkeypatch):
    _photos(tmp_path / "photos", 7)
    data = f"folder:{tmp_path / 'photos'}"
    monkeypatch.setenv("RANK", "1")  # as torchrun sets them
    monkeypatch.setenv("WORLD_SIZE", "2")
    first = _embed(tiny, data, tmp_path / "emb", shard_size=2)
    assert not first.complete and first.shards_written == 2  # shards 1 and 3
    assert sorted(p.name for p in (tmp_path / "emb").glob("emb-*")) == ["emb-000001.npy", "emb-000003.npy"]
    second = _embed(tiny, data, tmp_path / "emb", shard_size=2, rank=0, world_size=2)
    assert second.complete and second.shards_written == 2
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    _embed(tiny, data, tmp_path / "single", shard_size=2)
    assert np.array_equal(read_embeddings(tmp_path / "emb")[0], read_embeddings(tmp_path / "single")[0])


def test_csv_and_wds_sources(tiny, tmp_path):
    paths = _photos(tmp_path / "photos", 3)
    table = tmp_path / "photos" / "list.csv"
    table.write_text("filepath,caption\np01.jpg,one\np01.jpg,uno\np02.jpg,two\nmissing.jpg,gone\n")
    _embed(tiny, f"csv:{table}", tmp_path / "csv")
    _, records, manifest = read_embeddings(tmp_path / "csv")
    assert [(r["key"], r["caption"]) for r in records] == [("p01.jpg", "one"), ("p01.jpg#1", "uno"), ("p02.jpg", "two")]
    assert manifest["skipped"] == 1

    for t, chosen in enumerate(([0, 1], [2])):
        with tarfile.open(tmp_path / f"shard-{t}.tar", "w") as tar:
            for i in chosen:
                _add(tar, f"s{i}.jpg", paths[i].read_bytes())
                _add(tar, f"s{i}.txt", f"caption {i}".encode())
            _add(tar, f"bad{t}.jpg", b"garbage")
    result = _embed(tiny, f"wds:{tmp_path}/shard-{{0..1}}.tar", tmp_path / "wds", workers=2)
    assert (result.shards_total, result.embedded, result.skipped) == (2, 3, 2)
    x, records, _ = read_embeddings(tmp_path / "wds")
    assert [(r["key"], r["caption"]) for r in records] == [("s0", "caption 0"), ("s1", "caption 1"), ("s2", "caption 2")]
    np.testing.assert_allclose(x[2], read_embeddings(tmp_path / "csv")[0][2], atol=1e-6)  # the same image p02


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_text_embedding_of_a_caption_file(tiny, tmp_path):
    model, _, tokenizer, _ = tiny
    (tmp_path / "captions.txt").write_text("a red circle\n\na blue square\na red circle\n")
    _embed(tiny, str(tmp_path / "captions.txt"), tmp_path / "bank", text=True)
    x, records, manifest = read_embeddings(tmp_path / "bank")
    assert manifest["modality"] == "text" and [r["caption"] for r in records] == ["a red circle", "a blue square"]
    with torch.no_grad():
        ref = model.encode_text(tokenizer(["a red circle", "a blue square"]), normalize=True).numpy()
    np.testing.assert_allclose(x, ref, atol=2e-3)


def test_text_embedding_of_webdataset_captions(tiny, tmp_path):
    # .txt captions, a .json "caption", a sample without one, a repeated caption, and a tar cut short.
    model, _, tokenizer, _ = tiny
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        _add(tar, "a.jpg", b"x")
        _add(tar, "a.txt", b" a red circle \n")
        _add(tar, "b.jpg", b"x")
        _add(tar, "b.json", json.dumps({"caption": "a blue square"}).encode())
        _add(tar, "c.jpg", b"x")
        _add(tar, "d.txt", b"a red circle")
    with tarfile.open(tmp_path / "shard-1.tar", "w") as tar:
        _add(tar, "e.txt", b"a green triangle")
        _add(tar, "f.txt", b"never read" * 100)
    data = (tmp_path / "shard-1.tar").read_bytes()
    (tmp_path / "shard-1.tar").write_bytes(data[:2000])  # cut inside the second member: reading it raises
    _embed(tiny, f"wds:{tmp_path}/shard-{{0..1}}.tar", tmp_path / "bank", text=True)
    x, records, manifest = read_embeddings(tmp_path / "bank")
    captions = ["a red circle", "a blue square", "a green triangle"]
    assert manifest["modality"] == "text" and [r["caption"] for r in records] == captions
    with torch.no_grad():
        ref = model.encode_text(tokenizer(captions), normalize=True).numpy()
    np.testing.assert_allclose(x, ref, atol=2e-3)


def test_embed_refuses_bad_input(tiny, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.md").write_text("mine")
    _photos(tmp_path / "photos", 2)
    with pytest.raises(ValueError, match="not an embed job"):
        _embed(tiny, f"folder:{tmp_path / 'photos'}", tmp_path / "notes")
    with pytest.raises(ValueError, match="embed reads"):
        _embed(tiny, "synthetic:shapes", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        _embed(tiny, f"folder:{tmp_path / 'nowhere'}", tmp_path / "out")


def test_cli_embed_index_dedup(tiny, tmp_path, capsys):
    paths = _photos(tmp_path / "photos", 6)
    (tmp_path / "photos" / "copy.jpg").write_bytes(paths[3].read_bytes())  # an exact duplicate
    name = tiny[3]
    assert main(["embed", "--model", name, "--data", f"folder:{tmp_path / 'photos'}", "--out", str(tmp_path / "e"),
                 "--workers", "0", "--dtype", "float32", "--quiet"]) == 0  # fmt: skip
    assert main(["index", "--embeddings", str(tmp_path / "e"), "--out", str(tmp_path / "i")]) == 0
    assert "flat index of 7 x 24 vectors" in capsys.readouterr().out
    index = load_index(tmp_path / "i", model=name)
    assert {h.key for h in index.search(index.vector("p03.jpg"), 2)[0]} == {"copy.jpg", "p03.jpg"}
    assert main(["dedup", "--index", str(tmp_path / "i"), "--threshold", "0.999999", "--out", str(tmp_path / "d.csv")]) == 0
    lines = (tmp_path / "d.csv").read_text().splitlines()
    assert lines[0] == "a,b,score" and [line.rsplit(",", 1)[0] for line in lines[1:]] == ["copy.jpg,p03.jpg"]
    assert main(["index", "--embeddings", str(tmp_path / "nothing"), "--out", str(tmp_path / "j")]) == 2
    assert "not an embeddings directory" in capsys.readouterr().err


def test_fast_decode_is_opt_in_and_close(tiny, tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "big").mkdir()
    for i in range(3):
        smooth = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((20, 20, 1))).astype(np.uint8)  # (240, 320, 3)
        Image.fromarray(smooth).save(tmp_path / "big" / f"b{i}.jpg", quality=90)
    data = f"folder:{tmp_path / 'big'}"
    _embed(tiny, data, tmp_path / "exact")
    _embed(tiny, data, tmp_path / "fast", fast_decode=True)
    exact, fast = read_embeddings(tmp_path / "exact")[0], read_embeddings(tmp_path / "fast")[0]
    assert not np.array_equal(exact, fast) and (exact * fast).sum(1).min() > 0.9
    with pytest.raises(ValueError, match="fast_decode: True there, False now"):
        _embed(tiny, data, tmp_path / "fast")


def test_resume_refuses_a_changed_source(tiny, tmp_path):
    paths = _photos(tmp_path / "photos", 3)
    data = f"folder:{tmp_path / 'photos'}"
    _embed(tiny, data, tmp_path / "emb")
    (tmp_path / "photos" / "new.jpg").write_bytes(paths[0].read_bytes())
    with pytest.raises(ValueError, match="another job \\(the source's list of inputs changed\\)"):
        _embed(tiny, data, tmp_path / "emb")
