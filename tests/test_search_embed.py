"""clipworks embed / index / dedup: sources, broken inputs, resume, rank split, text, and the CLI end to end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
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
from clipworks.search.index import build_index, load_index
from clipworks.search.store import read_embeddings, seal_manifest


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
    with pytest.warns(UserWarning, match=r"shard-1\.tar: read stopped early: ReadError"):
        _embed(tiny, f"wds:{tmp_path}/shard-{{0..1}}.tar", tmp_path / "bank", text=True)
    x, records, manifest = read_embeddings(tmp_path / "bank")
    captions = ["a red circle", "a blue square", "a green triangle"]
    assert manifest["modality"] == "text" and [r["caption"] for r in records] == captions
    with torch.no_grad():
        ref = model.encode_text(tokenizer(captions), normalize=True).numpy()
    np.testing.assert_allclose(x, ref, atol=2e-3)


def test_wds_shard_cut_at_a_member_header_is_listed_as_skipped(tiny, tmp_path):
    paths = _photos(tmp_path / "photos", 3)
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for i, path in enumerate(paths):
            _add(tar, f"s{i}.jpg", path.read_bytes())
            _add(tar, f"s{i}.txt", f"caption {i}".encode())
    with tarfile.open(tmp_path / "shard-0.tar") as tar:
        cut = next(m.offset for m in tar.getmembers() if m.name == "s2.jpg")
    (tmp_path / "shard-0.tar").write_bytes((tmp_path / "shard-0.tar").read_bytes()[:cut])  # no end-of-archive block
    result = _embed(tiny, f"wds:{tmp_path}/shard-0.tar", tmp_path / "e")
    assert (result.embedded, result.skipped) == (2, 1)
    skipped = (tmp_path / "e" / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1
    assert skipped[0].startswith(f"shard-0.tar\tread stopped: ReadError: cut at a member header at byte {cut}")


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


def test_cli_index_refuses_a_changed_shard_of_a_resumed_embed(tiny, tmp_path, capsys):
    # Each shard's checksums are recorded as it is written, so a shard changed on disk before a resumed job
    # finishes is caught too; the index is not built.
    _photos(tmp_path / "photos", 6)
    data, out = f"folder:{tmp_path / 'photos'}", tmp_path / "e"

    def stop_after_one(shard):
        if shard == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _embed(tiny, data, out, shard_size=3, on_shard=stop_after_one)
    assert json.loads((out / "sha256-000000.json").read_text()).keys() == {"emb-000000.npy", "meta-000000.parquet"}
    shard = out / "emb-000000.npy"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x01  # one bit of one embedding
    shard.write_bytes(bytes(raw))
    assert _embed(tiny, data, out, shard_size=3).complete
    assert main(["index", "--embeddings", str(out), "--out", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"clipworks index: error: {shard}: checksum mismatch") and "\n" not in err
    assert not (tmp_path / "i").exists()


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
    with pytest.raises(ValueError, match="pass --update to embed only what changed"):
        _embed(tiny, data, tmp_path / "emb")


def _jpeg_file(path, seed: int, size=(40, 36)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path, quality=90)


def test_update_embeds_new_and_changed_files_and_drops_deleted_ones(tiny, tmp_path):
    photos = tmp_path / "photos"
    paths = _photos(photos, 7)
    (photos / "fixed.jpg").write_bytes(b"\xff\xd8 cut short")  # unreadable at first, repaired before the update
    data = f"folder:{photos}"
    _embed(tiny, data, tmp_path / "emb", shard_size=3)
    assert (tmp_path / "emb" / "skipped.txt").read_text().startswith("fixed.jpg\t")
    _jpeg_file(photos / "fixed.jpg", seed=12)
    before = dict(zip((r["key"] for r in read_embeddings(tmp_path / "emb")[1]), read_embeddings(tmp_path / "emb")[0]))
    paths[3].unlink()  # deleted
    _jpeg_file(photos / "new.jpg", seed=10)  # added
    _jpeg_file(paths[5], seed=11)  # changed in place (another size, another time)
    os.utime(paths[5], ns=(paths[5].stat().st_atime_ns, paths[5].stat().st_mtime_ns + 10**10))
    result = _embed(tiny, data, tmp_path / "emb", shard_size=3, update=True)
    assert (result.complete, result.embedded, result.removed, result.shards_written, result.shards_total) == (
        True, 3, 2, 1, 4)  # fmt: skip
    assert (tmp_path / "emb" / "skipped.txt").read_text() == ""  # fixed.jpg is in, no longer listed
    x, records, manifest = read_embeddings(tmp_path / "emb")
    keys = [r["key"] for r in records]
    want = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.jpg"))
    assert sorted(keys) == want and manifest["count"] == len(want) == 8
    # shards by path: (fixed.jpg skipped, nested/p00, nested/p04), (p01, p02, p03), (p05, p06), then the
    # update's (fixed, new, p05): p03 (shard 1, row 2) and the old p05 (shard 2, row 0) are removed
    assert manifest["removed"] == {"1": [2], "2": [0]} and manifest["shards"] == [2, 3, 2, 3]
    _embed(tiny, data, tmp_path / "fresh", shard_size=3)
    fresh = dict(zip((r["key"] for r in read_embeddings(tmp_path / "fresh")[1]), read_embeddings(tmp_path / "fresh")[0]))
    now = dict(zip(keys, x))
    for key in want:
        np.testing.assert_allclose(now[key], fresh[key], atol=2e-3)  # as a whole new embed would store them
        if key not in ("new.jpg", "p05.jpg", "fixed.jpg"):
            assert np.array_equal(now[key], before[key])  # untouched rows are the very same
    assert not np.allclose(now["p05.jpg"], before["p05.jpg"], atol=1e-2)
    assert {r["key"]: r["stamp"] for r in records}["new.jpg"] == f"{(photos / 'new.jpg').stat().st_size}:" \
        f"{(photos / 'new.jpg').stat().st_mtime_ns}"  # fmt: skip
    build_index(tmp_path / "emb", tmp_path / "index")  # no duplicate keys: the old p05 row is gone
    assert sorted(load_index(tmp_path / "index").keys) == want

    again = _embed(tiny, data, tmp_path / "emb", shard_size=3, update=True)  # nothing changed since
    assert (again.embedded, again.shards_written, again.removed, again.complete) == (0, 0, 2, True)
    plain = _embed(tiny, data, tmp_path / "emb", shard_size=3)  # a plain rerun of the updated job resumes it
    assert (plain.complete, plain.shards_written, plain.removed) == (True, 0, 2)
    assert read_embeddings(tmp_path / "emb")[1] == records


def _interrupt(shard: int) -> None:
    raise KeyboardInterrupt


def _assert_holds_every_photo(out, photos) -> None:
    keys = [r["key"] for r in read_embeddings(out)[1]]
    assert sorted(keys) == sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.jpg"))


def test_interrupted_update_keeps_the_old_collection_and_resumes(tiny, tmp_path):
    photos = tmp_path / "photos"
    _photos(photos, 4)
    data = f"folder:{photos}"
    _embed(tiny, data, tmp_path / "emb", shard_size=2)
    for i in range(5):
        _jpeg_file(photos / f"z{i}.jpg", seed=20 + i)

    with pytest.raises(KeyboardInterrupt):
        _embed(tiny, data, tmp_path / "emb", shard_size=2, update=True, on_shard=_interrupt)
    assert len(read_embeddings(tmp_path / "emb")[1]) == 4  # the last manifest still describes the old collection
    resumed = _embed(tiny, data, tmp_path / "emb", shard_size=2, update=True)
    assert (resumed.embedded, resumed.shards_written, resumed.removed, resumed.complete) == (3, 2, 0, True)
    _assert_holds_every_photo(tmp_path / "emb", photos)


def test_update_fills_the_shards_an_interrupted_embed_left(tiny, tmp_path):
    photos = tmp_path / "photos"
    _photos(photos, 6)
    data = f"folder:{photos}"

    with pytest.raises(KeyboardInterrupt):
        _embed(tiny, data, tmp_path / "emb", shard_size=2, on_shard=_interrupt)  # shard 0 of 3 written
    _jpeg_file(photos / "late.jpg", seed=30)
    result = _embed(tiny, data, tmp_path / "emb", shard_size=2, update=True)
    # 5 inputs without a row, 2 per shard: into the shards left unwritten (1, 2), then a new one (3)
    assert (result.embedded, result.shards_written, result.shards_total, result.complete) == (5, 3, 4, True)
    _assert_holds_every_photo(tmp_path / "emb", photos)


def test_update_refuses_what_it_cannot_do(tiny, tmp_path):
    photos = tmp_path / "photos"
    paths = _photos(photos, 3)
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        _add(tar, "s0.jpg", paths[0].read_bytes())
    wds = f"wds:{tmp_path}/shard-0.tar"
    first = _embed(tiny, wds, tmp_path / "wds", update=True)  # a new --out: a plain embed
    assert first.complete and first.embedded == 1
    with pytest.raises(ValueError, match="--update reads folder:, csv:, tsv: image sources"):
        _embed(tiny, wds, tmp_path / "wds", update=True)
    _embed(tiny, f"folder:{photos}", tmp_path / "emb")
    with pytest.raises(ValueError, match="modality: 'image' there, 'text' now"):
        _embed(tiny, f"folder:{photos}", tmp_path / "emb", text=True, update=True)
    with pytest.raises(ValueError, match="dtype: 'float16' there, 'float32' now"):
        _embed(tiny, f"folder:{photos}", tmp_path / "emb", dtype="float32", update=True)
    with pytest.raises(ValueError, match="in one process"):
        _embed(tiny, f"folder:{photos}", tmp_path / "emb", update=True, rank=0, world_size=2)
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    (tmp_path / "emb" / "manifest.json").write_text(json.dumps(seal_manifest({**manifest, "removed": {"0": [7]}})))
    with pytest.raises(ValueError, match="removes rows 7..7 of shard 0, which holds 3"):
        read_embeddings(tmp_path / "emb")


def test_cli_embed_update(tiny, tmp_path, capsys):
    photos = tmp_path / "photos"
    paths = _photos(photos, 3)
    name = tiny[3]
    args = ["embed", "--model", name, "--data", f"folder:{photos}", "--out", str(tmp_path / "e"), "--workers", "0",
            "--quiet"]  # fmt: skip
    assert main(args) == 0
    paths[1].unlink()
    _jpeg_file(photos / "added.jpg", seed=40)
    assert main(args + ["--update"]) == 0
    out = capsys.readouterr().out
    assert "1 embedded, 0 skipped, 1 rows of deleted or changed files removed" in out
    assert sorted(r["key"] for r in read_embeddings(tmp_path / "e")[1]) == ["added.jpg", "nested/p00.jpg", "p02.jpg"]


def test_shards_come_out_in_input_order_whatever_order_their_parts_arrive(tmp_path):
    from clipworks.search.embed import _run
    from clipworks.search.sources import Chunk, Plan
    from clipworks.search.store import read_shard_records

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((10, 4)).astype(np.float32)
    keys = [f"k{i}" for i in range(10)]
    # shard 0: parts of 3, 3, 1 rows (the middle one with a skipped input); shard 1: 2 and 1 rows
    spans = {(0, 0): (0, 3), (0, 1): (3, 5), (0, 2): (5, 6), (1, 0): (6, 8), (1, 1): (8, 10)}
    chunks = []
    for (shard, part), (a, b) in spans.items():
        records = [{"key": k} for k in keys[a:b]]
        chunk = Chunk(shard, records, None, ["bad\tunreadable"] if (shard, part) == (0, 1) else [], part == (2 if shard == 0 else 1),
                      part, emb[a:b])  # fmt: skip
        chunks.append(chunk)
    order = [4, 2, 0, 3, 1]  # shard 1's last part first, shard 0's parts backwards
    written = []
    plan = Plan("folder", [[None] * 7, [None] * 3], [], "")
    result = _run(tmp_path, [chunks[i] for i in order], [0, 1], plan, None, None, None, "float32", 4, False,
                  written.append)  # fmt: skip
    assert result == (2, 10, 1) and written == [1, 0]  # shard 1 completes first
    assert [r["key"] for r in read_shard_records(tmp_path, 0)] == keys[:6]
    assert [r["key"] for r in read_shard_records(tmp_path, 1)] == keys[6:]
    np.testing.assert_array_equal(np.load(tmp_path / "emb-000000.npy"), emb[:6])
    assert (tmp_path / "skipped-000000.txt").read_text() == "bad\tunreadable\n"


def test_worker_encoding_and_in_process_encoding_store_the_same_collection(tiny, tmp_path, monkeypatch):
    from clipworks.search import pipeline

    photos = tmp_path / "photos"
    _photos(photos, 10)
    for i, size in enumerate((300, 20, 200)):  # unequal batches: the largest files' batch is decoded first
        _jpeg_file(photos / f"big{i}.jpg", seed=50 + i, size=(size, size))
    data = f"folder:{photos}"
    monkeypatch.setattr(pipeline, "_cores", lambda: 2)  # two workers are enough for each to encode its own batches
    here = []  # batches encoded in this process (a forked worker appends to its own copy of the list)
    real = pipeline._encode_images
    monkeypatch.setattr(pipeline, "_encode_images", lambda *a: here.append(1) or real(*a))
    _embed(tiny, data, tmp_path / "workers", workers=2, shard_size=6)
    assert not here  # the workers sent embeddings, not pixels
    _embed(tiny, data, tmp_path / "here", workers=0, shard_size=6)
    assert len(here) == 5  # 13 images, shards of 6 in batches of 4: 4 + 2, 4 + 2, 1
    a, ra, _ = read_embeddings(tmp_path / "workers")
    b, rb, _ = read_embeddings(tmp_path / "here")
    assert ra == rb
    np.testing.assert_allclose(a, b, atol=2e-3)


_FAULTS = """
import resource, sys, torch
from clipworks.search.pipeline import _keep_freed_memory
kept = _keep_freed_memory() if sys.argv[1] == "keep" else None
def layers():  # a transformer's pattern: 20 MB temporaries made and freed, layer after layer
    x = torch.ones(1600, 768)
    for _ in range(12):
        h = torch.nn.functional.gelu(torch.ones(1600, 3072) * x.sum())
        x = x + h[:, :768]
        del h
layers()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # enough rounds that the default allocator, whose mmap threshold adapts, faults visibly
    layers()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_encoding_workers_keep_freed_memory_mapped(tiny, tmp_path, monkeypatch):
    from clipworks.search import pipeline
    from clipworks.search.sources import plan_images

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        kept, count = out.stdout.split()
        return kept, int(count)

    (kept, with_setting), (_, default) = faults("keep"), faults("default")
    assert kept == "True"
    # freed activations are reused, not unmapped and faulted in again: alone, 0 faults against 0.14-1.7 million; a
    # machine busy with other tests has shown 8,400 (so a margin of 5x, not more)
    assert with_setting * 5 < default
    _photos(tmp_path / "p", 4)
    plan = plan_images(f"folder:{tmp_path / 'p'}", 2)
    monkeypatch.setattr(pipeline, "_cores", lambda: 2)
    model, transform = tiny[:2]
    encoding = pipeline._image_loader(plan, [0, 1], transform, 2, 2, model, None)
    decoding = pipeline._image_loader(plan, [0, 1], transform, 2, 1, model, None)  # fewer workers than cores
    assert encoding.dataset.encoder is not None and encoding.worker_init_fn is pipeline._keep_freed_memory
    assert decoding.dataset.encoder is None and decoding.worker_init_fn is None


def test_cli_embed_refuses_a_preset_without_weights(tmp_path, capsys):
    _photos(tmp_path / "photos", 2)
    args = ["embed", "--model", "ViT-B-32", "--data", f"folder:{tmp_path / 'photos'}", "--out", str(tmp_path / "e")]
    assert main(args) == 2
    assert "random initialisation, new on every run" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    from clipworks.factory import names_no_weights

    assert names_no_weights("ViT-B-32", None) and not names_no_weights("ViT-B-32", "openai")
    assert not names_no_weights("ViT-B-32:openai", None) and not names_no_weights("local-dir:/m", None)
    assert not names_no_weights("hf-hub:org/repo", None)


def test_default_workers_share_the_cores(monkeypatch):
    from clipworks.search import pipeline

    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert pipeline.default_workers(torch.device("cpu")) == 16  # each worker also encodes
    assert pipeline.default_workers(torch.device("cuda")) == 15  # a core left for the process feeding the GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: four processes on this machine
    assert pipeline.default_workers(torch.device("cpu")) == 4 and pipeline.default_workers(torch.device("cuda")) == 3
