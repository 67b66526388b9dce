"""Resuming from damaged checkpoints and cleaning up after killed saves (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import tiny_config

from clipworks.train import state as run_state
from clipworks.train.loop import train


def _save(run_dir: Path, step: int) -> Path:
    model = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(model.weight, float(step))  # each checkpoint's weights name its step
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return run_state.save_checkpoint(run_dir, step, model.state_dict(), opt.state_dict(), sched.state_dict(),
                                     run_state.DataPosition(0, step))  # fmt: skip


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_checksums_of_every_file_are_written_with_the_checkpoint(tmp_path):
    path = _save(tmp_path, 3)
    marker = json.loads((path / run_state.COMPLETE_MARKER).read_text())
    assert marker["step"] == 3 and set(marker["sha256"]) == {run_state.STATE_FILE}
    assert run_state.load_checkpoint(path)["step"] == 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "drop"])
def test_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path, damage):
    _save(tmp_path, 1)
    intact = _save(tmp_path, 2)
    bad = run_state.checkpoint_dir(tmp_path, 3)
    _save(tmp_path, 3)
    state_file = bad / run_state.STATE_FILE
    if damage == "flip":
        _flip_byte(state_file)
    elif damage == "truncate":  # a torn write under a COMPLETE marker
        state_file.write_bytes(state_file.read_bytes()[: state_file.stat().st_size // 2])
    else:  # a marker written before checksums were, over a torn file: only the load can tell
        (bad / run_state.COMPLETE_MARKER).write_text("3\n")
        state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*step_00000003: state\.pt") as caught:
        resumed = run_state.load_resume("latest", tmp_path)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert resumed.path == intact and resumed.state["step"] == 2
    assert torch.equal(resumed.state["model"]["weight"], torch.full((2, 2), 2.0))


def test_checkpoint_without_checksums_still_resumes(tmp_path):
    path = _save(tmp_path, 4)
    (path / run_state.COMPLETE_MARKER).write_text("4\n")  # as written before issue 16
    assert run_state.load_resume("latest", tmp_path).state["step"] == 4


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    for step in (1, 2):
        _flip_byte(_save(tmp_path, step) / run_state.STATE_FILE)
    (run_state.checkpoint_dir(tmp_path, 2) / run_state.COMPLETE_MARKER).write_text("{not json")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no intact checkpoint") as info:
        run_state.load_resume("latest", tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "step_00000002: unreadable COMPLETE marker" in message and "step_00000001: state.pt differs" in message


def test_a_damaged_checkpoint_named_explicitly_is_an_error_not_a_fallback(tmp_path):
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    _flip_byte(bad / run_state.STATE_FILE)
    with pytest.raises(run_state.CorruptCheckpointError, match="step_00000002: state.pt differs"):
        run_state.load_resume(str(bad), tmp_path)


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    root = tmp_path / "checkpoints"
    kept = _save(tmp_path, 1)
    torn = root / ".step_00000002.k3j_x9ab"  # as tempfile.mkdtemp names them
    torn.mkdir()
    (torn / run_state.STATE_FILE).write_bytes(b"half")
    replaced = root / ".step_00000001.old"  # a replacement of step 1 finished: its old copy is stale
    replaced.mkdir()
    others = [root / "notes", root / ".step_1.abc", root / ".stepper.abc"]
    for p in others:
        p.mkdir()
    (root / ".step_00000003.file").write_text("a file, not a directory")
    removed = run_state.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([torn, replaced])
    assert not torn.exists() and not replaced.exists() and kept.is_dir()
    assert all(p.exists() for p in others) and (root / ".step_00000003.file").is_file()


def test_a_save_killed_between_its_renames_is_restored_not_removed(tmp_path):
    path = _save(tmp_path, 5)
    old = path.with_name(f".{path.name}.old")
    path.rename(old)  # atomic_directory moved the old copy aside, then died before renaming the new one in
    assert run_state.remove_stale_temporaries(tmp_path) == []
    assert run_state.load_checkpoint(path)["step"] == 5 and not old.exists()


def test_a_run_resumes_from_the_previous_checkpoint_when_the_latest_is_damaged(tmp_path, capsys):
    args = ["--run.save_every", "1", "--data.eval_size", "0", "--run.tensorboard", "false"]
    train(tiny_config(tmp_path, "--run.steps", "2", *args))
    _flip_byte(run_state.checkpoint_dir(tmp_path, 2) / run_state.STATE_FILE)
    torn = tmp_path / "checkpoints" / ".step_00000003.deadbeef"  # a save of step 3 that was killed
    torn.mkdir()
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"step_00000002: state\.pt differs from the checksum"):
        result = train(tiny_config(tmp_path, "--run.steps", "3", "--run.resume", "latest", *args))
    assert f"resumed from {run_state.checkpoint_dir(tmp_path, 1)} at step 1" in capsys.readouterr().out
    assert result.step == 3 and not torn.exists()
    assert run_state.load_checkpoint(run_state.checkpoint_dir(tmp_path, 2))["step"] == 2  # rewritten, intact
