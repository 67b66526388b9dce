"""Metadata columns from embed's inputs to the index (csv/tsv columns, WebDataset `.json` fields), and the
LAION aesthetic score written at embed time (issue 21)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_search_embed import tiny  # noqa: F401 (a fixture: model, preprocess, tokenizer, local-dir spec)

from clipworks.cli import main
from clipworks.eval.scoring import build_aesthetic_mlp, load_head
from clipworks.search.embed import embed_collection
from clipworks.search.filters import parse_filter_string
from clipworks.search.index import build_index
from clipworks.search.store import read_embeddings

FIXED = {"key", "path", "caption", "member", "stamp"}


def _embed(tiny, data, out, **kw):
    model, preprocess, _, name = tiny
    kw.setdefault("workers", 0)
    return embed_collection(model, data, out, model_name=name, transform=preprocess, batch_size=4, progress=False,
                            **kw)  # fmt: skip


def _photos(folder, n: int) -> list:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"p{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _aesthetic_head(path, embed_dim: int, seed: int = 0):
    """A state dict shaped as LAION's improved aesthetic predictor (`layers.N.*`), saved as its .pth is."""
    torch.manual_seed(seed)
    mlp = build_aesthetic_mlp(embed_dim)
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, path)
    return mlp


def test_csv_columns_are_typed_and_reach_the_index(tiny, tmp_path):
    _photos(tmp_path / "photos", 5)
    table = tmp_path / "photos" / "list.csv"
    table.write_text("filepath,caption,width,similarity,licensed,source,zip,mixed,bad name,score\n"
                     "p0.jpg,zero,640,0.31,true,laion,00123,1,x,9\n"
                     "p1.jpg,one,,0.5,False,,00456,two,y,8\n"
                     "p2.jpg,two,1024,1,TRUE,coyo,01000,3.5,z,7\n"
                     "p3.jpg,three,800,.25e1,false,laion,12345,,w,6\n")  # fmt: skip
    with pytest.warns(UserWarning, match=r"metadata columns 'bad name', 'score' left out") as caught:
        _embed(tiny, f"csv:{table}", tmp_path / "emb", shard_size=3)
    assert len([w for w in caught if "left out" in str(w.message)]) == 1
    _, records, _ = read_embeddings(tmp_path / "emb")
    assert records[0] == {"key": "p0.jpg", "path": str((tmp_path / "photos" / "p0.jpg").resolve()), "caption": "zero",
                          "member": None, "stamp": records[0]["stamp"], "width": 640, "similarity": 0.31,
                          "licensed": True, "source": "laion", "zip": "00123", "mixed": "1"}  # fmt: skip
    assert [r["width"] for r in records] == [640, None, 1024, 800]
    assert [r["similarity"] for r in records] == [0.31, 0.5, 1.0, 2.5]
    assert [r["licensed"] for r in records] == [True, False, True, False]
    assert [r["source"] for r in records] == ["laion", None, "coyo", "laion"]
    assert [r["mixed"] for r in records] == ["1", "two", "3.5", None]
    index = build_index(tmp_path / "emb", tmp_path / "index")
    assert index.column_kinds == {"width": "number", "similarity": "number", "licensed": "bool", "source": "string",
                                  "zip": "string", "mixed": "string"}  # fmt: skip
    assert index.record("p2.jpg") == {"key": "p2.jpg", "path": str((tmp_path / "photos" / "p2.jpg").resolve()),
                                      "caption": "two", "member": None, "width": 1024, "similarity": 1.0,
                                      "licensed": True, "source": "coyo", "zip": "01000", "mixed": "3.5"}  # fmt: skip
    hits = index.search(index.vector("p0.jpg"), 4, where=parse_filter_string("source=laion;width>=700"))[0]
    assert [h.key for h in hits] == ["p3.jpg"] and hits[0].metadata["similarity"] == 2.5


def test_csv_update_and_resume_keep_the_columns(tiny, tmp_path):
    _photos(tmp_path / "photos", 4)
    table = tmp_path / "photos" / "list.tsv"
    table.write_text("filepath\tcaption\tyear\np0.jpg\ta\t2020\np1.jpg\tb\t2021\n")
    data = f"tsv:{table}"
    _embed(tiny, data, tmp_path / "emb")
    table.write_text("filepath\tcaption\tyear\np0.jpg\ta\t2020\np1.jpg\tb\t2021\np2.jpg\tc\t2022.5\n")
    _embed(tiny, data, tmp_path / "emb", update=True)
    _, records, _ = read_embeddings(tmp_path / "emb")
    assert sorted((r["key"], r["year"]) for r in records) == [("p0.jpg", 2020), ("p1.jpg", 2021), ("p2.jpg", 2022.5)]
    index = build_index(tmp_path / "emb", tmp_path / "index")
    assert index.column_kinds == {"year": "number"} and index.record("p2.jpg")["year"] == 2022.5
    assert sorted(h.key for h in index.search(index.vector("p0.jpg"), 3, where=parse_filter_string("year>2020"))[0]) \
        == ["p1.jpg", "p2.jpg"]  # fmt: skip


def test_webdataset_json_scalars_become_columns(tiny, tmp_path):
    paths = _photos(tmp_path / "photos", 3)
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for i, path in enumerate(paths):
            meta = {"key": f"00000000{i}", "caption": f"a photo {i}", "url": f"https://example.com/{i}.jpg",
                    "width": 40, "height": 30 + i, "original_width": 400 + i, "similarity": 0.25 + i / 10,
                    "status": "success", "error_message": None, "exif": "{}", "nested": {"a": 1},
                    "tags": ["x"], "member": "clash"}  # fmt: skip
            if i == 2:
                del meta["similarity"]
            _add(tar, f"s{i}.jpg", path.read_bytes())
            _add(tar, f"s{i}.json", json.dumps(meta).encode())
    with pytest.warns(UserWarning, match=r"metadata columns 'member' left out"):
        _embed(tiny, f"wds:{tmp_path}/shard-0.tar", tmp_path / "emb", workers=1)
    _, records, _ = read_embeddings(tmp_path / "emb")
    assert records[1] == {"key": "s1", "path": str((tmp_path / "shard-0.tar").resolve()), "caption": "a photo 1",
                          "member": "s1.jpg", "stamp": None, "url": "https://example.com/1.jpg", "width": 40,
                          "height": 31, "original_width": 401, "similarity": 0.35, "status": "success",
                          "error_message": None, "exif": "{}"}  # fmt: skip
    assert records[2]["similarity"] is None
    index = build_index(tmp_path / "emb", tmp_path / "index")
    assert index.column_kinds == {"url": "string", "width": "number", "height": "number", "original_width": "number",
                                  "similarity": "number", "status": "string", "error_message": "string",
                                  "exif": "string"}  # fmt: skip
    assert index.record("s0")["url"] == "https://example.com/0.jpg"
    hits = index.search(index.vector("s0"), 3, where=parse_filter_string("similarity>0.3"))[0]
    assert sorted(h.key for h in hits) == ["s1"]


def test_folder_sources_have_no_metadata(tiny, tmp_path):
    _photos(tmp_path / "photos", 2)
    _embed(tiny, f"folder:{tmp_path / 'photos'}", tmp_path / "emb")
    assert all(set(r) == FIXED for r in read_embeddings(tmp_path / "emb")[1])
    assert build_index(tmp_path / "emb", tmp_path / "index").column_kinds == {}


def test_aesthetic_column_is_the_head_on_the_stored_embeddings(tiny, tmp_path):
    _photos(tmp_path / "photos", 6)
    mlp = _aesthetic_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", 24)
    data = f"folder:{tmp_path / 'photos'}"
    _embed(tiny, data, tmp_path / "emb", aesthetic_head=tmp_path / "sac+logos+ava1-l14-linearMSE.pth",
           dtype="float32", shard_size=4)  # fmt: skip
    x, records, _ = read_embeddings(tmp_path / "emb")
    with torch.no_grad():
        expected = mlp(torch.from_numpy(x)).numpy()
        loaded = load_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth").head(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose([r["aesthetic"] for r in records], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(expected, loaded, rtol=1e-6)
    index = build_index(tmp_path / "emb", tmp_path / "index")
    assert index.column_kinds == {"aesthetic": "number"}
    best = max(records, key=lambda r: r["aesthetic"])
    where = parse_filter_string(f"aesthetic>={best['aesthetic']}")
    assert [h.key for h in index.search(x[0], 5, where=where)[0]] == [best["key"]]
    assert json.loads((tmp_path / "emb" / "job.json").read_text())["aesthetic_head"]


def test_aesthetic_head_refusals(tiny, tmp_path):
    _photos(tmp_path / "photos", 5)
    data = f"folder:{tmp_path / 'photos'}"
    _aesthetic_head(tmp_path / "head.pth", 24, seed=0)
    _aesthetic_head(tmp_path / "other.pth", 24, seed=1)
    _aesthetic_head(tmp_path / "wide.pth", 768)

    def interrupt(shard):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _embed(tiny, data, tmp_path / "emb", aesthetic_head=tmp_path / "head.pth", shard_size=2, on_shard=interrupt)
    with pytest.raises(ValueError, match=r"holds embeddings of another job \(aesthetic_head: '[0-9a-f]{64}' there, "):
        _embed(tiny, data, tmp_path / "emb", aesthetic_head=tmp_path / "other.pth", shard_size=2)
    with pytest.raises(ValueError, match=r"aesthetic_head: '[0-9a-f]{64}' there, None now"):
        _embed(tiny, data, tmp_path / "emb", shard_size=2)
    result = _embed(tiny, data, tmp_path / "emb", aesthetic_head=tmp_path / "head.pth", shard_size=2)
    assert result.complete and result.shards_resumed == 1
    assert all(isinstance(r["aesthetic"], float) for r in read_embeddings(tmp_path / "emb")[1])
    with pytest.raises(ValueError, match="reads 768-d embeddings; the model gives 24-d"):
        _embed(tiny, data, tmp_path / "wide-emb", aesthetic_head=tmp_path / "wide.pth")
    model, preprocess, tokenizer, name = tiny
    with pytest.raises(ValueError, match="aesthetic head scores images"):
        embed_collection(model, data, tmp_path / "t", model_name=name, tokenizer=tokenizer,
                         text=True, aesthetic_head=tmp_path / "head.pth")  # fmt: skip
    assert not (tmp_path / "wide-emb").exists() and not (tmp_path / "t").exists()


def test_cli_embed_aesthetic_head(tiny, tmp_path, capsys):
    _photos(tmp_path / "photos", 3)
    _aesthetic_head(tmp_path / "head.pth", 24)
    base = ["embed", "--model", tiny[3], "--data", f"folder:{tmp_path / 'photos'}", "--workers", "0", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "e"), "--aesthetic-head", str(tmp_path / "head.pth")]) == 0
    assert all("aesthetic" in r for r in read_embeddings(tmp_path / "e")[1])
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "t"), "--text", "--aesthetic-head", str(tmp_path / "head.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--aesthetic-head scores images" in err[0]
    _aesthetic_head(tmp_path / "wide.pth", 768)
    assert main(base + ["--out", str(tmp_path / "w"), "--aesthetic-head", str(tmp_path / "wide.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reads 768-d embeddings" in err[0]
