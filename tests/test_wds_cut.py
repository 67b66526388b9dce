"""WebDataset shards cut short or corrupted anywhere (inside a member, at or inside a member header) are reported."""

from __future__ import annotations

import io
import tarfile
import warnings

import pytest
from PIL import Image

from clipworks.config import PreprocessConfig
from clipworks.data.wds import WebDataset, tar_samples
from clipworks.transforms import image_transform

TRANSFORM = image_transform(PreprocessConfig(image_size=16))
SAMPLES = 6
CUT_SAMPLE = 4  # the cuts below fall in this sample's image member: samples 0..3 are whole before them


def _shard(path) -> dict[str, int]:
    """A tar of SAMPLES (png, txt) samples; returns each member's header offset by name."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(SAMPLES):
            png = io.BytesIO()
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(png, "PNG")
            for name, data in ((f"{i:03d}.png", png.getvalue()), (f"{i:03d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {m.name: m.offset for m in tar.getmembers()}


def _read(path) -> tuple[list[str], list[str]]:
    """(captions read, warnings) of one pass over the shard."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(WebDataset([str(path)], TRANSFORM, shuffle=False))
    return [s[1] for s in samples if s is not None], [str(w.message) for w in caught]


def _cut(path, offsets, where: str) -> None:
    header = offsets[f"{CUT_SAMPLE:03d}.png"]
    end = {"inside a member": header + 512 + 20, "at a member header": header, "inside a member header": header + 100}
    path.write_bytes(path.read_bytes()[: end[where]])


def test_whole_shard_reads_without_warning(tmp_path):
    _shard(tmp_path / "s.tar")
    captions, caught = _read(tmp_path / "s.tar")
    assert captions == [f"caption {i}" for i in range(SAMPLES)] and caught == []


@pytest.mark.parametrize("where", ["inside a member", "at a member header", "inside a member header"])
def test_cut_shard_is_reported_and_read_up_to_the_cut(tmp_path, where):
    offsets = _shard(tmp_path / "s.tar")
    _cut(tmp_path / "s.tar", offsets, where)
    captions, caught = _read(tmp_path / "s.tar")
    assert captions == [f"caption {i}" for i in range(CUT_SAMPLE)]
    assert len(caught) == 1 and caught[0].startswith(f"shard {tmp_path / 's.tar'}: read stopped early: ReadError")


def test_shard_ending_after_its_last_member_without_end_blocks_is_cut(tmp_path):
    offsets = _shard(tmp_path / "s.tar")
    last = offsets[f"{SAMPLES - 1:03d}.txt"]
    (tmp_path / "s.tar").write_bytes((tmp_path / "s.tar").read_bytes()[: last + 1024])  # header + one data block
    captions, caught = _read(tmp_path / "s.tar")
    assert captions == [f"caption {i}" for i in range(SAMPLES)]  # every sample was whole: all are read
    assert len(caught) == 1 and "cut at a member header" in caught[0]


def test_corrupt_member_header_is_reported(tmp_path):
    offsets = _shard(tmp_path / "s.tar")
    data = bytearray((tmp_path / "s.tar").read_bytes())
    data[offsets[f"{CUT_SAMPLE:03d}.png"] + 3] ^= 0x01  # a byte of the name: the header checksum no longer holds
    (tmp_path / "s.tar").write_bytes(bytes(data))
    captions, caught = _read(tmp_path / "s.tar")
    assert captions == [f"caption {i}" for i in range(CUT_SAMPLE)]
    assert len(caught) == 1 and "corrupt member header" in caught[0]


def test_tar_samples_keeps_the_whole_members_of_the_sample_in_progress(tmp_path):
    offsets = _shard(tmp_path / "s.tar")
    txt = offsets[f"{CUT_SAMPLE:03d}.txt"]
    (tmp_path / "s.tar").write_bytes((tmp_path / "s.tar").read_bytes()[:txt])  # the image is whole, its caption gone
    got = []
    with pytest.raises(tarfile.ReadError, match=f"cut at a member header at byte {txt}"):
        for key, files in tar_samples(str(tmp_path / "s.tar")):
            got.append((key, sorted(files)))
    assert got == [(f"{i:03d}", ["png", "txt"]) for i in range(CUT_SAMPLE)] + [(f"{CUT_SAMPLE:03d}", ["png"])]


def test_empty_and_non_tar_files_are_still_not_tars(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    for name in ("empty.tar", "junk.tar"):
        with pytest.raises(tarfile.ReadError) as e:
            list(tar_samples(str(tmp_path / name)))
        assert "member header" not in str(e.value)
