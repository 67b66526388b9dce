"""What clipworks writes gets the modes of the user's umask, as a plain open() or mkdir would (issue 17): weights,
checkpoints, run state, embeddings and indexes were 0600 files in 0700 directories whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from clipworks.checkpoints.io import apply_umask, atomic_directory, current_umask


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


def _assert_umask_modes(root: Path, umask: int) -> None:
    modes = _modes(root)
    dirs = {name for name in modes if (root / name).is_dir()}
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o777 if name in dirs else 0o666) & ~umask}  # fmt: skip
    assert not wrong, f"under umask {umask:03o}: {wrong}"
    assert len(modes) - len(dirs) >= 2  # files were checked, not only directories


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask
    assert os.umask(umask) == umask  # unchanged


def test_weights_in_every_layout_get_the_umask_modes(tmp_path, umask):
    from reference import tiny_config

    import clipworks
    from clipworks.checkpoints.export import save_pretrained
    from clipworks.presets import get_preset

    model = clipworks.create_model(tiny_config(get_preset("ViT-B-32")))
    out = tmp_path / "out"
    out.mkdir()
    for layout in ("clipworks", "open_clip", "transformers"):
        save_pretrained(model, out / layout, format=layout)  # safetensors itself writes 0600 files
    save_pretrained(model, out / "clipworks")  # replacing one too
    _assert_umask_modes(out, umask)


def test_run_state_checkpoints_get_the_umask_modes(tmp_path, umask):
    from clipworks.train import state as run_state

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = tmp_path / "run"
    for step in (1, 1, 2):  # a new checkpoint, the same replaced, another
        run_state.save_checkpoint(run, step, model.state_dict(), opt.state_dict(), sched.state_dict(),
                                  run_state.DataPosition())  # fmt: skip
    _assert_umask_modes(run, umask)


def test_embeddings_indexes_and_pairs_get_the_umask_modes(tmp_path, umask):
    from clipworks.search.dedup import find_duplicates, write_pairs
    from clipworks.search.index import build_index
    from clipworks.search.store import write_embeddings

    out = tmp_path / "out"
    out.mkdir()
    vectors = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)
    write_embeddings(out / "emb", vectors, [{"key": f"k{i}"} for i in range(12)], model="m")
    index = build_index(out / "emb", out / "index", kind="flat")
    build_index(out / "emb", out / "index", kind="flat")  # replaced
    write_pairs(find_duplicates(index, 0.0), out / "pairs.csv")
    _assert_umask_modes(out, umask)


def test_a_failed_atomic_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("died")
    assert list(tmp_path.iterdir()) == []


def test_apply_umask_leaves_links_alone(tmp_path, umask):
    target = tmp_path / "target"
    target.write_text("x")
    os.chmod(target, 0o400)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("y")
    os.chmod(tree / "sub" / "f", 0o600)
    (tree / "link").symlink_to(target)
    apply_umask(tree)
    assert stat.S_IMODE(target.stat().st_mode) == 0o400
    assert stat.S_IMODE((tree / "sub" / "f").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tree / "sub").stat().st_mode) == 0o777 & ~umask
