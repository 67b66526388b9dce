"""Commands that print or write model outputs refuse a preset without weights unless --random-init is given."""

from __future__ import annotations

import pytest
from PIL import Image

from clipworks.cli import main


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize(
    "argv",
    [["classify", "--model", "ViT-B-32", "--labels", "cat,dog"],
     ["eval", "zeroshot", "--model", "ViT-B-32", "--data", "synthetic:shapes", "--no-progress", "--no-cache"],
     ["demo"]],  # fmt: skip
    ids=["classify", "eval", "demo"],
)
def test_a_preset_without_weights_is_refused_in_one_line(argv, photo, capsys):
    argv = [*argv, str(photo)] if argv[0] == "classify" else argv
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "random initialisation" in err[0] and "--random-init" in err[0], err


def test_random_init_is_accepted_where_asked(photo, capsys):
    assert main(["classify", "--model", "ViT-B-32", "--random-init", "--labels", "cat,dog", str(photo)]) == 0
    out = capsys.readouterr().out
    assert str(photo) in out and "cat" in out and "dog" in out


def test_named_weights_need_no_flag(tmp_path, photo, capsys):
    import clipworks

    model = clipworks.create_model("ViT-B-32")
    clipworks.save_pretrained(model, tmp_path / "m")
    assert main(["classify", "--model", f"local-dir:{tmp_path / 'm'}", "--labels", "cat,dog", str(photo)]) == 0
