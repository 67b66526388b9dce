"""The run side of the fine-tuning controls (issue 19): checkpoint retention, Weights & Biases logging, torch.compile
and the augmentation keys."""

from __future__ import annotations

import csv
import json
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from processes import kill_when_ready
from test_train import tiny_config

from clipworks.train import state as run_state
from clipworks.train.loop import train

FAST = ["--data.eval_size", "0", "--run.tensorboard", "false", "--optim.warmup_steps", "0"]


def _save(run_dir: Path, step: int) -> Path:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return run_state.save_checkpoint(run_dir, step, model.state_dict(), opt.state_dict(), sched.state_dict(),
                                     run_state.DataPosition(0, step))  # fmt: skip


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in run_state.complete_checkpoints(run_dir))


# --- checkpoint retention ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("keep", "keep_every", "left"), [(2, 0, [6, 7]), (2, 3, [3, 6, 7]), (0, 3, list(range(1, 8))),
                                                          (1, 2, [2, 4, 6, 7])])  # fmt: skip
def test_retention_keeps_the_newest_and_the_milestones(tmp_path, keep, keep_every, left):
    for step in range(1, 8):
        run_state.remove_old_checkpoints(tmp_path, keep, keep_every, written=_save(tmp_path, step))
    assert _steps(tmp_path) == left
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_retention_spares_the_checkpoint_just_written_and_directories_not_ours(tmp_path):
    for step in (1, 2, 5):
        _save(tmp_path, step)
    (run_state.checkpoint_dir(tmp_path, 1) / "notes.txt").write_text("mine")  # someone else's file inside
    unfinished = run_state.checkpoint_dir(tmp_path, 0)
    unfinished.mkdir()
    (unfinished / run_state.STATE_FILE).write_bytes(b"")  # no completion marker
    written = _save(tmp_path, 3)  # a run resumed from an earlier step saves below the newest
    assert run_state.remove_old_checkpoints(tmp_path, 1, written=written) == [run_state.checkpoint_dir(tmp_path, 2)]
    assert _steps(tmp_path) == [1, 3, 5] and unfinished.is_dir()


def test_a_short_run_keeps_what_the_config_says(tmp_path):
    train(tiny_config(tmp_path, *FAST, "--run.steps", "5", "--run.save_every", "1", "--run.keep_checkpoints", "1",
                      "--run.keep_every", "2"))  # fmt: skip
    assert _steps(tmp_path) == [2, 4, 5]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


_KILLED_REMOVAL = """
import shutil, sys, time
from pathlib import Path

import torch

from clipworks.train import state as run_state

run_dir, ready = Path(sys.argv[1]), sys.argv[2]
for step in (1, 2, 3):
    model = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(model.weight, float(step))
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run_state.save_checkpoint(run_dir, step, model.state_dict(), opt.state_dict(), sched.state_dict(),
                              run_state.DataPosition())

def slow_rmtree(path, *args, **kwargs):
    (Path(path) / run_state.STATE_FILE).unlink()  # one file gone, the marker still there: then the process dies
    open(ready, "w").close()
    time.sleep(600)

shutil.rmtree = slow_rmtree
run_state.remove_old_checkpoints(run_dir, 1, written=run_state.checkpoint_dir(run_dir, 3))
"""


def test_a_process_killed_mid_removal_is_never_resumed_from(tmp_path):
    ready = tmp_path / "removing"
    kill_when_ready([sys.executable, "-c", _KILLED_REMOVAL, str(tmp_path), str(ready)], ready, "started removing")
    root = tmp_path / "checkpoints"
    half = root / ".step_00000002.removed"
    assert (half / run_state.COMPLETE_MARKER).is_file() and not (half / run_state.STATE_FILE).exists()
    assert _steps(tmp_path) == [1, 3]
    newest = run_state.checkpoint_dir(tmp_path, 3) / run_state.STATE_FILE
    newest.write_bytes(newest.read_bytes()[:100])  # the newest one damaged too: "latest" falls back past step 2
    with pytest.warns(UserWarning, match="step_00000003"):
        resumed = run_state.load_resume("latest", tmp_path)
    assert resumed.state["step"] == 1 and torch.equal(resumed.state["model"]["weight"], torch.ones(2, 2))
    assert run_state.remove_stale_temporaries(tmp_path) == [half] and not half.exists()


@pytest.mark.parametrize("gone", [run_state.STATE_FILE, run_state.COMPLETE_MARKER])
def test_a_half_removed_checkpoint_directory_is_not_complete(tmp_path, gone):
    _save(tmp_path, 1)
    half = _save(tmp_path, 2)
    (half / gone).unlink()  # as a removal by other means (rm -r) leaves it when killed
    assert not run_state.is_complete(half)
    assert run_state.latest_checkpoint(tmp_path) == run_state.checkpoint_dir(tmp_path, 1)
    assert run_state.load_resume("latest", tmp_path).state["step"] == 1
    assert run_state.remove_old_checkpoints(tmp_path, 1) == []  # not complete: not counted, not touched
    assert half.is_dir()


# --- Weights & Biases --------------------------------------------------------------------------------------------------


def _wandb_records(path: Path):
    """The records of a `.wandb` transaction log (a LevelDB-style log of protobuf `Record`s: a 7-byte header, then
    32 KiB blocks of chunks, each with a 7-byte header: CRC32, length, kind). wandb has no Python reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_run(run_dir: Path, index: int) -> tuple[object, list[dict[str, str]]]:
    """The run record and the history rows of the `index`-th W&B run written in `run_dir/wandb`."""
    (log,) = sorted(run_dir.glob("wandb/offline-run-*"))[index].glob("run-*.wandb")
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(log)):  # written after finish()
        assert time.monotonic() < deadline, f"{log} never got its exit record"
        time.sleep(0.2)
    run, history = None, []
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return run, history


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
                        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
                        "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}.items():  # fmt: skip
        monkeypatch.setenv(name, value)


def test_wandb_logs_the_metrics_offline_and_a_resumed_run_continues_it(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    extra = [*FAST, "--run.wandb", "true", "--run.wandb_project", "controls", "--run.log_every", "1"]
    train(tiny_config(run_dir, *extra, "--run.steps", "2"))
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    run, history = _wandb_run(run_dir, 0)
    assert (run.run_id, run.display_name, run.project) == (run_id, "run", "controls")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["data"]["batch_size"] == 16 and config["run"]["wandb"] is True  # the resolved config
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [h["_step"] for h in history] == ["1", "2"]
    for h, row in zip(history, rows):
        assert float(h["loss"]) == pytest.approx(float(row["loss"]), rel=1e-5)
        assert float(h["lr"]) == pytest.approx(float(row["lr"]), rel=1e-5)

    train(tiny_config(run_dir, *extra, "--run.steps", "3", "--run.resume", "latest"))
    run, history = _wandb_run(run_dir, 1)
    assert run.run_id == run_id and [h["_step"] for h in history] == ["3"]


def test_a_fresh_start_makes_a_new_wandb_run(tmp_path, wandb_offline):
    from clipworks.train.metrics_log import start_wandb

    (tmp_path / "wandb_run_id").write_text("oldrun\n")
    run = start_wandb(tmp_path, "p", {}, resumed=False)
    run.finish()
    assert run.id != "oldrun" and (tmp_path / "wandb_run_id").read_text().strip() == run.id


def test_missing_wandb_is_one_line_naming_the_extra_before_anything_starts(tmp_path, monkeypatch, capsys):
    from clipworks.cli import main as cli_main

    monkeypatch.setitem(sys.modules, "wandb", None)  # as after `pip install clipworks`
    argv = ["train", "--out", str(tmp_path / "run"), "--run.wandb", "true", *FAST, "--run.steps", "1",
            "--model.vision_layers", "1", "--model.text_layers", "1", "--data.batch_size", "4"]  # fmt: skip
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'clipworks[wandb]'" in err[0], err
    assert not (tmp_path / "run").exists()


# --- torch.compile -----------------------------------------------------------------------------------------------------


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with the "eager" backend: Dynamo captures and wraps the model as it does for Inductor, without
    the minutes Inductor's C++ code generation takes on this CPU (it works here: benchmarks in RunConfig.compile)."""
    calls, real = [], torch.compile

    def compile_eagerly(model, **kwargs):
        calls.append(model)
        return real(model, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    return calls


def test_a_compiled_run_saves_plain_keys_that_load_and_resume_uncompiled(tmp_path, eager_compile):
    from clipworks.train.loop import build_model

    common = [*FAST, "--data.augment", "false"]
    compiled = train(tiny_config(tmp_path / "c", *common, "--run.steps", "2", "--run.compile", "true"))
    assert len(eager_compile) == 1
    state = run_state.load_checkpoint(run_state.checkpoint_dir(compiled.run_dir, 2))
    assert state["model"] and not [k for k in state["model"] if "_orig_mod" in k]
    plain, _ = build_model(tiny_config(tmp_path / "c").model)
    plain.load_state_dict(state["model"])  # strict: every key of the uncompiled model, no other
    resumed = train(tiny_config(tmp_path / "c", *common, "--run.steps", "3", "--run.resume", "latest"))
    assert resumed.step == 3 and len(eager_compile) == 1  # resumed without compile, from the compiled run's state


# --- augmentation keys ---------------------------------------------------------------------------------------------


def _image(size: int = 64) -> Image.Image:
    gen = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy())


def _runner(tmp_path: Path, *extra: str):
    from clipworks.train.distributed import setup_distributed
    from clipworks.train.loop import Runner

    cfg = tiny_config(tmp_path, *FAST, *extra)
    return Runner(cfg, setup_distributed("cpu", cfg.run.parallel), tmp_path)


def test_the_default_keys_give_todays_training_transform(tmp_path):
    from clipworks.transforms import AugmentConfig, TrainTransform, image_transform

    transform = _runner(tmp_path).train_transform
    assert isinstance(transform, TrainTransform) and transform.augment == AugmentConfig()
    before = image_transform(transform.cfg, train=True)  # what the loop built before the keys existed
    for seed in range(3):
        torch.manual_seed(seed)
        ours = transform(_image())
        torch.manual_seed(seed)
        assert torch.equal(ours, before(_image()))


def test_the_augmentation_keys_reach_the_training_transform(tmp_path):
    from clipworks.transforms import EvalTransform

    flip = ["--data.aug_scale", "1,1", "--data.aug_ratio", "1,1", "--data.aug_interpolation", "bilinear"]
    flipped = _runner(tmp_path / "a", *flip, "--data.aug_hflip", "1.0").train_transform
    straight = _runner(tmp_path / "b", *flip).train_transform
    assert flipped.augment.interpolation == "bilinear"
    for _ in range(3):  # the whole image, resized: flipped every time
        assert torch.equal(flipped(_image()), straight(_image()).flip(-1))
    quarter = _runner(tmp_path / "c", "--data.aug_scale", "0.25,0.25", "--data.aug_ratio", "1,1").train_transform
    assert quarter.crop_box(64, 64)[2:] == (32, 32)
    jitter = _runner(tmp_path / "d", "--data.aug_color_jitter", "0.4").train_transform
    assert jitter.augment.color_jitter == 0.4
    plain = _runner(tmp_path / "e", "--data.augment", "false", "--data.aug_hflip", "1.0").train_transform
    assert isinstance(plain, EvalTransform)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("data.aug_scale", "0,1", "data.aug_scale=(0.0, 1.0): expected 0 < min <= max <= 1"),
    ("data.aug_ratio", "2,1", "data.aug_ratio=(2.0, 1.0): expected 0 < min <= max"),
    ("data.aug_hflip", "1.5", "data.aug_hflip=1.5: expected a probability in [0, 1]"),
    ("data.aug_color_jitter", "1", "data.aug_color_jitter=1.0: expected a strength in [0, 1)"),
    ("data.aug_interpolation", "box", "expected one of ['bicubic', 'bilinear', 'nearest']"),
])  # fmt: skip
def test_bad_augmentation_keys_are_one_line_errors(tmp_path, key, value, message):
    with pytest.raises(ValueError) as info:
        tiny_config(tmp_path, f"--{key}", value)
    assert message in str(info.value) and "\n" not in str(info.value)

