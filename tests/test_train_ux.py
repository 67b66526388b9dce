"""What `clipworks train` tells its user and how it stops (issue 17): the plan and a measured time estimate, Ctrl-C
saving a checkpoint it can resume from, and no run directory left by a run that failed before learning anything."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import TINY, tiny_config

from clipworks.cli import main as cli_main
from clipworks.train import console
from clipworks.train import state as run_state
from clipworks.train.config import RunConfig
from clipworks.train.console import TimeEstimate
from clipworks.train.loop import build_model, train


def test_the_start_prints_the_run_model_data_and_steps_then_a_measured_estimate(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(console, "ESTIMATE_STEPS", 4)  # 20 in a real run; a slow (loaded) test machine needs no more
    cfg = tiny_config(tmp_path / "run", "--run.steps", "6", "--data.eval_size", "8", "--run.tensorboard", "false")
    train(cfg)
    out = capsys.readouterr().out.splitlines()
    params = sum(p.numel() for p in build_model(cfg.model)[0].parameters())
    assert out[:4] == [
        f"run: {tmp_path / 'run'}",
        f"model: tiny, {params / 1e6:.1f}M parameters, random init",
        "data: synthetic:shapes?size=256&seed=0&image_size=32 (256 samples); 8 held-out scenes for zero-shot "
        "evaluation",
        "steps: 6 steps of 16 samples, 0.38 epochs on cpu in fp32; a checkpoint every 250 steps, evaluation every 250",
    ]
    # timed over steps 2-5 (the first includes start-up), then the step left at that speed
    estimate = [line for line in out if line.startswith("time:")]
    assert len(estimate) == 1
    assert re.fullmatch(r"time: about \d+ s for the 1 step left, at \d+ samples/s measured over the last 4 steps "
                        r"on this machine \(evaluations and checkpoints extra\)", estimate[0]), estimate  # fmt: skip


def test_the_estimate_is_the_measured_speed_times_the_steps_left():
    estimate = TimeEstimate(total_steps=1001)
    assert estimate.update(1, 5.0, 16) is None  # the first step (start-up) only starts the clock
    for step in range(2, 21):
        assert estimate.update(step, 5.0 + 0.1 * (step - 1), 16 * step) is None
    line = estimate.update(21, 7.0, 16 * 21)  # 20 steps of 16 samples in 2 s: 160 samples/s, 0.1 s a step
    assert line.startswith("time: about 2 min for the 980 steps left, at 160 samples/s")  # 98 s
    assert estimate.update(22, 7.1, 16 * 22) is None  # said once


def test_a_slow_model_gets_its_estimate_after_a_minute():
    estimate = TimeEstimate(total_steps=100)
    estimate.update(1, 30.0, 8)
    assert estimate.update(3, 80.0, 24) is None  # 2 steps timed: too few, even after 50 s
    # then 3 steps in 75 s: 25 s a step
    assert estimate.update(4, 105.0, 32).startswith("time: about 40 min for the 96 steps left, at 0 samples/s")


def test_the_default_run_saves_about_every_minute():
    # The default run's 2,000 steps took 7 minutes (AMD Zen 5) and 8.3 (Intel Xeon, other jobs beside it) on 2
    # cores: a checkpoint every 250 steps is one a minute (a crash loses at most that; Ctrl-C loses nothing), and
    # a save of its 93 MB state took 0.2-0.5 s, under 1% of the run.
    assert RunConfig().steps / RunConfig().save_every == 8


# `clipworks train` whose checkpoint saves write half a file, say so, then hang (until a second Ctrl-C)
_HANGING_SAVE = """
import sys, time, torch
from clipworks.cli import main
ready = sys.argv[1]

def hanging_save(obj, f, *args, **kwargs):
    with open(f, "wb") as out:
        out.write(b"half of a checkpoint")
    open(ready, "w").close()
    time.sleep(120)

torch.save = hanging_save
sys.exit(main(sys.argv[2:]))
"""


def _wait_for(condition, child: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, f"{what} did not happen in 2 minutes"
        time.sleep(0.05)


def _interrupt_after_first_steps(run: Path, steps: int, hang_saves: bool = False) -> subprocess.CompletedProcess:
    """`clipworks train` in its own process group, sent SIGINT as a terminal's Ctrl-C is (to the data worker too)
    once its first step is logged; with `hang_saves`, sent another once its checkpoint save has begun."""
    ready = run.parent / "saving"
    start = [sys.executable, "-c", _HANGING_SAVE, str(ready)] if hang_saves else [sys.executable, "-m", "clipworks.cli"]
    args = [*start, "train", *TINY, "--run.out_dir", str(run), "--run.steps", str(steps), "--data.workers", "1",
            "--data.eval_size", "0", "--run.log_every", "1", "--run.save_every", "0", "--run.tensorboard", "false"]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        metrics = run / "metrics.csv"  # a header, then step 1
        _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) > 1, child, "a logged step")
        os.killpg(child.pid, signal.SIGINT)
        if hang_saves:
            _wait_for(ready.exists, child, "a checkpoint save")
            os.killpg(child.pid, signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    return subprocess.CompletedProcess(args, child.returncode, out, err)


def test_ctrl_c_saves_a_checkpoint_at_the_current_step_and_says_how_to_resume(tmp_path, capsys):
    run = tmp_path / "run"
    done = _interrupt_after_first_steps(run, steps=100_000)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"clipworks train: interrupted at step (\d+): saved (\S+); resume with: (.+)", last)
    assert match, done.stderr
    step, saved, command = int(match[1]), Path(match[2]), match[3]
    assert step >= 1 and saved == run_state.checkpoint_dir(run, step)
    assert run_state.latest_checkpoint(run) == saved and run_state.load_checkpoint(saved)["step"] == step
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary left
    assert command == shlex.join(["clipworks", "train", "--config", str(run / "config.yaml"), "--run.out_dir",
                                  str(run), "--run.resume", "latest"])  # fmt: skip
    # The command resumes (here with a nearer end: the interrupted run was to take 100,000 steps).
    argv = shlex.split(command)
    assert cli_main([*argv[1:], "--run.steps", str(step + 2), "--data.workers", "0", "--run.progress", "false"]) == 0
    assert f"resumed from {saved} at step {step}" in capsys.readouterr().out
    assert run_state.latest_checkpoint(run) == run_state.checkpoint_dir(run, step + 2)
    assert (run / "model" / "model.safetensors").is_file()


def test_a_second_ctrl_c_during_the_save_quits_and_leaves_no_half_written_checkpoint(tmp_path):
    run = tmp_path / "run"
    done = _interrupt_after_first_steps(run, steps=100_000, hang_saves=True)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"clipworks train: interrupted at step \d+: nothing saved \(no checkpoint yet\)", last), last
    assert list((run / "checkpoints").iterdir()) == []  # the temporary directory of the torn save is gone
    assert run_state.latest_checkpoint(run) is None and (run / "config.yaml").is_file()


@pytest.mark.parametrize("override", [["--data.train", "csv:{tmp}/missing.csv"], ["--model.name", "no-such-model"],
                                      ["--data.batch_size", "512"]], ids=["missing-csv", "bad-model", "no-full-batch"])
def test_a_run_that_fails_before_its_first_step_leaves_no_directory(tmp_path, monkeypatch, override):
    monkeypatch.chdir(tmp_path)  # the default run directory, runs/<timestamp>, would go here
    override = [arg.replace("{tmp}", str(tmp_path)) for arg in override]
    assert cli_main(["train", *TINY, "--run.steps", "2", *override]) != 0
    assert not (tmp_path / "runs").exists()
    assert cli_main(["train", *TINY, "--run.steps", "2", "--run.out_dir", "a/b/run", *override]) != 0
    assert not (tmp_path / "a").exists()


def test_a_failed_run_leaves_a_directory_it_did_not_create(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        train(tiny_config(tmp_path, "--data.train", f"csv:{tmp_path / 'missing.csv'}"))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
