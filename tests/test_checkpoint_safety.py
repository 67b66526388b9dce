"""Hostile weight files (issue 16): zip bombs, huge safetensors headers, out-of-bounds views, looping modules."""

from __future__ import annotations

import collections
import io
import json
import pickle
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipworks.checkpoints import io as ckpt_io
from clipworks.checkpoints.io import CheckpointError, load_state_dict

_CODE = 'class M(Module):\n  __parameters__ = ["w", ]\n  __buffers__ = []\n'


class _Storage:
    """Pickled as torch.save pickles a storage: a persistent record naming `data/<key>` and its element count."""

    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _View:
    """Pickled as torch.save pickles a float tensor: `_rebuild_tensor_v2(storage, offset, size, stride, ...)`."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel) if isinstance(obj, _Storage) else None


def _archive(path: Path, obj, storages: dict[str, int], *, deflate=False, script=False) -> Path:
    """A zip laid out as torch.save (or, with `script`, torch.jit.save) lays it out, each storage `nbytes` zeros
    written 1 MiB at a time (so a test never holds a big buffer)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/version", "3\n")
        if script:
            zf.writestr("archive/code/__torch__.py", _CODE)
        for key, nbytes in storages.items():
            info = zipfile.ZipInfo(f"archive/data/{key}")
            info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            with zf.open(info, "w", force_zip64=True) as out:
                for start in range(0, nbytes, 2**20):
                    out.write(bytes(min(2**20, nbytes - start)))
    return path


@pytest.fixture
def script_module(monkeypatch):
    """Make a `__torch__.M` object (what torch.jit.save pickles a module as) whose state is `state_of(itself)`."""

    def make(state_of):
        class M:
            def __reduce__(self):
                return M, (), state_of(self)

        M.__module__, M.__qualname__ = "__torch__", "M"
        monkeypatch.setitem(sys.modules, "__torch__", types.SimpleNamespace(M=M))
        return M()

    return make


def _refused(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("script", [False, True], ids=["torch.save", "torchscript"])
def test_zip_bomb_is_refused_before_anything_inflates(tmp_path, monkeypatch, script_module, script):
    numel = 16 * 2**20  # 64 MiB of float zeros, deflated to about 64 KiB
    view = _View(_Storage("0", numel), 0, (numel,), (1,))
    obj = script_module(lambda self: {"w": view}) if script else {"w": view}
    path = _archive(tmp_path / "bomb.pt", obj, {"0": 4 * numel}, deflate=True, script=script)
    assert path.stat().st_size < 2**20

    def inflate(*args, **kwargs):
        raise AssertionError("a record was read before the archive was checked")

    monkeypatch.setattr(torch, "load", inflate)
    monkeypatch.setattr(zipfile.ZipFile, "open", inflate)
    _refused(path, r"zip record 'archive/data/0' inflates from \d+ to 67108864 bytes")


def test_compressed_but_honest_archive_still_loads(tmp_path):
    """The inflation cap refuses bombs, not a re-zipped file of real (incompressible) weights."""
    weights = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    torch.save(weights, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as src, zipfile.ZipFile(tmp_path / "zipped.pt", "w") as out:
        for name in src.namelist():
            out.writestr(name, src.read(name), compress_type=zipfile.ZIP_DEFLATED)
    loaded = load_state_dict(tmp_path / "zipped.pt")
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())


def test_archive_over_the_total_cap_is_refused(tmp_path, monkeypatch):
    torch.save({"w": torch.zeros(1024)}, tmp_path / "w.pt")
    assert load_state_dict(tmp_path / "w.pt")["w"].shape == (1024,)
    monkeypatch.setattr(ckpt_io, "MAX_ARCHIVE_BYTES", 4000)
    _refused(tmp_path / "w.pt", r"inflates to \d+ bytes, more than 4000")


def test_zip_with_too_many_records_is_refused_before_its_directory_is_read(tmp_path, monkeypatch):
    torch.save({f"w{i}": torch.zeros(1) for i in range(20)}, tmp_path / "w.pt")
    monkeypatch.setattr(ckpt_io, "MAX_ZIP_RECORDS", 10)
    monkeypatch.setattr(zipfile.ZipFile, "__init__", lambda *a, **k: pytest.fail("the directory was read"))
    _refused(tmp_path / "w.pt", r"zip archive of 2\d records, more than 10")


@pytest.mark.parametrize("script", [False, True], ids=["torch.save", "torchscript"])
def test_view_past_its_storage_is_refused(tmp_path, script_module, script):
    view = _View(_Storage("0", 4), 2, (1000,), (1,))
    obj = script_module(lambda self: {"w": view}) if script else {"w": view}
    _refused(_archive(tmp_path / "oob.pt", obj, {"0": 16}, script=script), "storage")


def test_storage_larger_than_declared_is_not_read(tmp_path, script_module, monkeypatch):
    view = _View(_Storage("0", 4), 0, (4,), (1,))
    path = _archive(tmp_path / "big.pt", script_module(lambda self: {"w": view}), {"0": 4096}, script=True)
    _refused(path, "storage 0 holds 4096 bytes, not the 16 its tensors declare")


def test_module_that_contains_itself_is_refused(tmp_path, script_module):
    view = _View(_Storage("0", 4), 0, (4,), (1,))
    path = _archive(tmp_path / "loop.pt", script_module(lambda self: {"w": view, "child": self}), {"0": 16},
                    script=True)  # fmt: skip
    _refused(path, "loops back on itself at 'child'")


def test_modules_nested_too_deep_are_refused(tmp_path, script_module):
    view = _View(_Storage("0", 4), 0, (4,), (1,))
    depth = {"n": 0}

    def state(self):  # every module holds a new child, 300 deep
        depth["n"] += 1
        return {"w": view, **({"child": type(self)()} if depth["n"] < 300 else {})}

    _refused(_archive(tmp_path / "deep.pt", script_module(state), {"0": 16}, script=True), "nest deeper than")


def _safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("count, ok", [(200, True), (201, False)])
def test_safetensors_with_too_many_tensors_is_refused_before_it_is_parsed(tmp_path, monkeypatch, count, ok):
    # zero-size tensors: 1.2 M of them in an 83 MB header cost safetensors 1.5 GB (issue 16)
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}
    path = _safetensors(tmp_path / "many.safetensors", header)
    monkeypatch.setattr(ckpt_io, "MAX_TENSORS", 200)
    if ok:
        assert len(load_state_dict(path)) == 200
        return
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a: pytest.fail("safetensors parsed the header"))
    _refused(path, "lists up to 201 tensors, more than 200")


@pytest.mark.parametrize(
    "offsets, match",
    [([0, 8], "outside its 4 data bytes"), ([-4, 4], "outside"), ([4, 0], "outside"), ([0, "4"], "outside"),
     (None, "outside")],
)  # fmt: skip
def test_safetensors_offsets_outside_the_file_are_refused(tmp_path, monkeypatch, offsets, match):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a: pytest.fail("safetensors parsed the header"))
    path = _safetensors(tmp_path / "w.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}},
                        b"\0" * 4)  # fmt: skip
    _refused(path, match)


def test_safetensors_header_longer_than_the_cap_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    assert load_state_dict(path)["w"].shape == (3,)
    monkeypatch.setattr(ckpt_io, "MAX_SAFETENSORS_HEADER", 16)
    _refused(path, "header length")


def test_unsafe_pickle_refusal_is_one_line(tmp_path):
    torch.save({"f": getattr}, tmp_path / "evil.pt")
    assert "Unsupported global" in _refused(tmp_path / "evil.pt", "weights_only")
