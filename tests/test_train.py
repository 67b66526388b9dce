"""Training: run configs, optimiser groups, schedule, run state, zero-shot metrics, the loop, `clipworks train`."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from processes import kill_when_ready

import clipworks
from clipworks.cli import main as cli_main
from clipworks.train import state as run_state
from clipworks.train.config import TrainConfig, load_config, save_config
from clipworks.train.loop import NonFiniteLossError, build_model, train
from clipworks.train.optim import WarmupCosine, build_optimizer, param_groups
from clipworks.train.zeroshot import accuracy, build_classifier, retrieval_recall

# A model and data small enough that a step takes milliseconds on a loaded 2-core CPU.
TINY = ["--model.embed_dim", "32", "--model.image_size", "32", "--model.patch_size", "8",
        "--model.vision_width", "32", "--model.vision_layers", "1", "--model.vision_heads", "2",
        "--model.text_width", "32", "--model.text_layers", "1", "--model.text_heads", "2",
        "--data.train", "synthetic:shapes?size=256&seed=0&image_size=32", "--data.batch_size", "16",
        "--data.workers", "0", "--run.progress", "false"]  # fmt: skip


def tiny_config(out_dir: Path, *extra: str) -> TrainConfig:
    return load_config(None, [*TINY, "--run.out_dir", str(out_dir), *extra])


# --- configs ------------------------------------------------------------------------------------------------


def test_config_yaml_then_overrides_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1\n  betas: [0.8, 0.9]\nrun:\n  steps: 7\n  resume: latest\n")
    cfg = load_config(path, ["--run.steps", "9", "--model.lock_image", "true", "--optim.betas", "0.5,0.6",
                             "--loss.chunk_size=64", "--run.resume", "none"])  # fmt: skip
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.5, 0.6) and cfg.run.steps == 9 and cfg.model.lock_image is True
    assert cfg.loss.chunk_size == 64 and cfg.run.resume is None
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.widht", "3"], "model.widht"),
        (["--optimizer.lr", "3"], "optimizer"),
        (["--run.steps", "ten"], "run.steps"),
        (["--loss.kind", "triplet"], "siglip"),
        (["--run.steps"], "no value"),
    ],
)
def test_config_rejects_bad_keys_and_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_unknown_key_lists_valid_keys(tmp_path):
    (tmp_path / "run.yaml").write_text("data:\n  batchsize: 3\n")
    with pytest.raises(ValueError, match=r"data\.batchsize.*batch_size"):
        load_config(tmp_path / "run.yaml")


def test_cli_rejects_unknown_key(capsys):
    assert cli_main(["train", "--run.stpes", "3"]) == 2
    assert "run.stpes" in capsys.readouterr().err


# --- optimiser and schedule ------------------------------------------------------------------------------------


def test_no_decay_on_gains_biases_embeddings_and_temperature():
    model, _ = build_model(tiny_config(Path("unused")).model)
    decayed, plain = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert {"logit_scale", "visual.class_token", "visual.pos_embed", "text.pos_embed",
            "text.token_embed.weight"} <= plain_names  # fmt: skip
    assert all(n.endswith(("bias", "weight")) or "embed" in n or n in ("logit_scale", "visual.class_token")
               for n in plain_names)  # fmt: skip
    assert all(p.ndim == 2 or p.ndim == 4 for p in decayed["params"])
    assert all("embed.weight" not in names[id(p)] or "patch" in names[id(p)] for p in decayed["params"])


def test_locked_tower_is_not_optimised():
    cfg = tiny_config(Path("unused"), "--model.lock_image", "true")
    model, _ = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in optimised for p in model.visual.parameters())
    assert all(id(p) in optimised for p in model.text.parameters())


def test_warmup_then_cosine():
    f = WarmupCosine(warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    assert WarmupCosine(10, 110, "constant")(100) == 1.0


# --- zero-shot helpers -----------------------------------------------------------------------------------------


def test_classifier_averages_normalised_templates():
    model, tokenizer = build_model(tiny_config(Path("unused")).model)
    model.eval()
    w = build_classifier(model, tokenizer, ["red circle", "blue square"], ["a {}.", "a photo of a {}."])
    assert w.shape == (2, 32)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(2))
    one = torch.nn.functional.normalize(model.encode_text(tokenizer(["a red circle."])), dim=-1)
    two = torch.nn.functional.normalize(model.encode_text(tokenizer(["a photo of a red circle."])), dim=-1)
    torch.testing.assert_close(w[0], torch.nn.functional.normalize(one + two, dim=-1)[0], atol=1e-5, rtol=0)


def test_accuracy_and_recall():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2]])
    assert accuracy(logits, torch.tensor([1, 2]), topk=(1, 2)) == {1: 0.5, 2: 1.0}
    feats = torch.eye(3)
    texts = torch.eye(3)[[0, 2, 1]]  # image 1 is closest to text 2, image 2 to text 1
    r = retrieval_recall(feats, texts, ks=(1, 3))
    assert r["image_to_text@1"] == pytest.approx(1 / 3) and r["image_to_text@3"] == 1.0
    same = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 1, 1]], dtype=torch.bool)  # texts 1 and 2 are equal captions
    assert retrieval_recall(feats, texts, same, ks=(1,))["text_to_image@1"] == 1.0


# --- run state -------------------------------------------------------------------------------------------------


def test_rng_state_roundtrip_loads_weights_only(tmp_path):
    import random

    import numpy as np

    saved = run_state.rng_state()
    torch.save(saved, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    run_state.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _states(model, optimizer, scheduler) -> tuple[dict, dict, dict]:
    return model.state_dict(), optimizer.state_dict(), scheduler.state_dict()


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(1, 10))
    done = run_state.save_checkpoint(tmp_path, 5, *_states(model, opt, sched), run_state.DataPosition(1, 2))
    # A crash mid-save: a newer directory without its completion marker, and a leftover temporary directory.
    half = run_state.checkpoint_dir(tmp_path, 9)
    half.mkdir()
    (half / run_state.STATE_FILE).write_bytes(b"trunc")
    (tmp_path / "checkpoints" / ".step_00000012.abcd").mkdir()
    assert run_state.latest_checkpoint(tmp_path) == done
    state = run_state.load_checkpoint(done)
    assert state["step"] == 5 and state["data"] == {"epoch": 1, "step_in_epoch": 2}
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        run_state.resolve_resume(str(half), tmp_path)
    assert run_state.resolve_resume("latest", tmp_path / "fresh") is None


# --- the loop and the command ----------------------------------------------------------------------------------


def test_cli_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *TINY, "--run.out_dir", str(out), "--run.steps", "24", "--run.log_every", "4",
            "--run.eval_every", "12", "--run.save_every", "12", "--data.eval_size", "40"]  # fmt: skip
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "zero-shot top-1" in printed and "image_to_text@1" in printed
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 16, 20, 24]
    assert rows[2]["zero_shot_top1"] != "" and rows[0]["zero_shot_top1"] == ""
    assert all(math.isfinite(float(r["loss"])) and float(r["logit_scale"]) <= 100 + 1e-4 for r in rows)
    assert load_config(out / "config.yaml").run.steps == 24
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000012", "step_00000024"]
    model = clipworks.create_model(f"local-dir:{out / 'model'}")
    tokens = clipworks.get_tokenizer(f"local-dir:{out / 'model'}")(["a red circle"])
    assert model.encode_text(tokens).shape == (1, 32)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [4, 8, 12, 16, 20, 24]
    assert [e.step for e in events.Scalars("train/zero_shot_top1")] == [12, 24]
    assert events.Scalars("train/loss")[-1].value == pytest.approx(float(rows[-1]["loss"]), rel=1e-5)
    curves = Image.open(out / "curves.png")  # loss, learning rate and zero-shot curves, drawn at the end of the run
    assert curves.format == "PNG" and curves.width > 2 * curves.height  # three panels (tests/test_plots.py: labels)
    assert "held-out combinations, top-1" in (out / "curves.svg").read_text()


_RESUME_CHILD = """
import sys, torch
from clipworks.train.config import load_config
from clipworks.train.loop import train
cfg = load_config(None, sys.argv[1:])
train(cfg)
"""


def test_resume_in_new_process_matches_uninterrupted_run(tmp_path):
    n = 6
    # With augmentation and a worker process: each sample's augmentation is seeded by itself, not by the worker.
    whole = train(tiny_config(tmp_path / "whole", "--run.steps", str(2 * n), "--run.save_every", str(n),
                              "--data.eval_size", "0", "--data.batch_size", "48", "--data.workers", "1"))  # fmt: skip
    first_half = run_state.checkpoint_dir(whole.run_dir, n)
    # Steps n+1..2n again in a fresh interpreter, from the step-n checkpoint (what a restart after a crash does).
    # 256 samples / 48 per batch = 5 batches per epoch: the resumed run also crosses an epoch boundary.
    args = [*TINY, "--run.out_dir", str(tmp_path / "resumed"), "--run.steps", str(2 * n), "--run.save_every",
            str(n), "--data.eval_size", "0", "--data.batch_size", "48", "--run.resume", str(first_half),
            "--data.workers", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run([sys.executable, "-c", _RESUME_CHILD, *args], check=True, env=env, timeout=120)
    expected = run_state.load_checkpoint(run_state.checkpoint_dir(whole.run_dir, 2 * n))
    got = run_state.load_checkpoint(run_state.checkpoint_dir(tmp_path / "resumed", 2 * n))
    assert got["data"] == expected["data"] and got["step"] == 2 * n
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), key
    assert got["optimizer"]["state"]["visual.patch_embed.weight"]["step"] == 2 * n  # state keyed by parameter name
    for name, value in expected["optimizer"]["state"].items():
        assert torch.equal(got["optimizer"]["state"][name]["exp_avg_sq"], value["exp_avg_sq"]), name


class _NanAt:
    """A CLIP loss that turns NaN at one call, to exercise the non-finite handling."""

    def __init__(self, at: int):
        from clipworks.train.losses import ClipLoss

        self.loss, self.calls, self.at = ClipLoss(), 0, at

    def __call__(self, *args):
        self.calls += 1
        value = self.loss(*args)
        return value * float("nan") if self.calls == self.at else value


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss(tmp_path, monkeypatch, policy):
    from clipworks.train import losses

    monkeypatch.setattr(losses, "build_loss", lambda kind, **kw: _NanAt(3))
    cfg = tiny_config(tmp_path, "--run.steps", "4", "--data.eval_size", "0", "--run.nonfinite", policy)
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match="at step 3"):
            train(cfg)
    else:
        result = train(cfg)
        assert result.step == 4 and math.isfinite(result.loss)
        rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
        assert rows[-1]["skipped_steps"] == "1" and rows[-1]["skipped"] == "0"


def test_existing_run_needs_resume(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(1, 10))
    run_state.save_checkpoint(tmp_path, 1, *_states(model, opt, sched), run_state.DataPosition())
    with pytest.raises(ValueError, match="resume latest"):
        train(tiny_config(tmp_path, "--run.steps", "2", "--data.eval_size", "0"))
    assert not (tmp_path / "config.yaml").exists()


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path):
    # A run trained to its end (learning rate 0), resumed with a larger --run.steps, trains on: the cosine
    # is recomputed over the new total from the current step instead of staying at the saved schedule's end.
    base = ["--data.eval_size", "0", "--optim.warmup_steps", "2", "--run.save_every", "4", "--run.log_every", "1"]
    train(tiny_config(tmp_path, "--run.steps", "4", *base))
    before = _final_weights(tmp_path, 4)
    train(tiny_config(tmp_path, "--run.steps", "8", "--run.resume", "latest", *base))
    with open(tmp_path / "metrics.csv") as f:
        rows = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    lr = load_config(None, TINY).optim.lr
    for step in (5, 6, 7):  # logged after the step: the factor of the next one
        assert rows[step] == pytest.approx(lr * WarmupCosine(2, 8)(step), rel=1e-6)
    after = _final_weights(tmp_path, 8)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_default_run_directory_is_timestamped(monkeypatch, tmp_path):
    from clipworks.train.loop import Distributed, _run_dir

    cfg = TrainConfig()
    assert cfg.run.out_dir is None and cfg.data.train.startswith("synthetic:shapes")
    assert _run_dir(cfg, Distributed()).parent == Path("runs")
    with pytest.raises(ValueError, match="out_dir"):
        _run_dir(cfg, Distributed(rank=1, world_size=2))


def test_short_default_run_learns(tmp_path):
    """The default model, data and batch for 40 steps: held-out zero-shot accuracy far above chance."""
    overrides = ["--run.out_dir", str(tmp_path), "--run.steps", "40", "--optim.warmup_steps", "10",
                 "--run.eval_every", "0", "--data.eval_size", "300", "--run.progress", "false"]  # fmt: skip
    cfg = load_config(None, overrides)
    result = train(cfg)
    assert result.eval.top1 > 3 * result.eval.chance, result.eval.format()
    assert result.eval.recall["text_to_image@5"] > 0.15, result.eval.format()


@pytest.mark.parametrize("extra", [[], ["--optim.accum_steps", "2"], ["--run.parallel", "fsdp", "--optim.grad_clip",
                                   "0.05"]], ids=["ddp", "ddp-accum", "fsdp"])  # fmt: skip
def test_two_process_gloo_step_matches_one_process(tmp_path, extra):
    """torchrun with 2 CPU processes x 16 images gives the same weights as 1 process x 32 (the same samples),
    also when each process splits its batch into micro-batches (features gathered across processes)."""
    # With a large eps AdamW's update is about lr * gradient / eps, so a gradient scaled wrongly across ranks shows.
    common = [*TINY, "--run.steps", "2", "--run.save_every", "1", "--data.eval_size", "0", "--data.augment", "false",
              "--optim.lr", "1", "--optim.eps", "1", "--optim.warmup_steps", "0", "--optim.grad_clip", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*torchrun, "-m", "clipworks.cli", "train", *common, "--data.batch_size", "16", *extra,
                    "--run.out_dir", str(tmp_path / "ddp")], check=True, env=env, timeout=300)  # fmt: skip
    clip = extra[-1:] if "fsdp" in extra else []  # FSDP: also the global gradient norm over shards
    train(load_config(None, [*common, "--data.batch_size", "32", "--run.out_dir", str(tmp_path / "one"),
                             *(["--optim.grad_clip", *clip] if clip else [])]))
    ddp = run_state.load_checkpoint(run_state.checkpoint_dir(tmp_path / "ddp", 2))["model"]
    one = run_state.load_checkpoint(run_state.checkpoint_dir(tmp_path / "one", 2))["model"]
    before = run_state.load_checkpoint(run_state.checkpoint_dir(tmp_path / "one", 1))["model"]
    assert max((one[k] - before[k]).abs().max().item() for k in one) > 1e-3  # the second step moved the weights
    for key, value in one.items():
        torch.testing.assert_close(ddp[key], value, atol=2e-6, rtol=1e-5, msg=key)
    if clip:  # the whole state FSDP's ranks gathered at step 1 resumes in one process, with the same step 2
        train(load_config(None, [*common, "--data.batch_size", "32", "--run.out_dir", str(tmp_path / "resumed"),
                                 "--optim.grad_clip", *clip, "--run.resume",
                                 str(run_state.checkpoint_dir(tmp_path / "ddp", 1))]))  # fmt: skip
        resumed = run_state.load_checkpoint(run_state.checkpoint_dir(tmp_path / "resumed", 2))["model"]
        for key, value in one.items():
            torch.testing.assert_close(resumed[key], value, atol=2e-6, rtol=1e-5, msg=key)


def test_batches_of_only_broken_samples_are_skipped_and_counted(tmp_path):
    from clipworks.data.datasets import EpochSampler

    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.jpg").write_bytes(b"not an image")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(data / "red.png")
    # The third batch of the first epoch (the loop's order: seed 0) is all broken images, the others readable.
    third = set(EpochSampler(12, batch_size=4, seed=0).indices()[8:12])
    rows = [f"{'broken.jpg' if i in third else 'red.png'},image {i}" for i in range(12)]
    (data / "captions.csv").write_text("filepath,caption\n" + "\n".join(rows) + "\n")
    run = tmp_path / "run"
    cfg = tiny_config(run, "--run.steps", "3", "--data.eval_size", "0", "--data.train", f"csv:{data / 'captions.csv'}",
                      "--data.batch_size", "4", "--data.workers", "0")  # fmt: skip
    result = train(cfg)
    assert result.step == 3 and (run / "model" / "model.safetensors").is_file()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert rows[-1]["skipped_steps"] == "1" and rows[-1]["skipped"] == "4"


@pytest.mark.parametrize("steps", [2, 40], ids=["shorter-than-the-check", "stopped-at-the-start"])
def test_a_csv_of_only_missing_images_fails_and_writes_no_model(tmp_path, capsys, steps):
    data = tmp_path / "data"
    data.mkdir()
    (data / "captions.csv").write_text("filepath,caption\n" + "".join(f"gone{i}.jpg,a cat\n" for i in range(8)))
    run = tmp_path / "run"
    args = ["train", *TINY, "--run.out_dir", str(run), "--run.steps", str(steps), "--data.eval_size", "0",
            "--data.train", f"csv:{data / 'captions.csv'}", "--data.batch_size", "4"]  # fmt: skip
    assert cli_main(args) != 0
    err = capsys.readouterr().err.strip()
    assert str(data / "captions.csv") in err and "\n" not in err
    # 40 steps: stopped after 16 empty batches (64 samples); 2 steps: ran out, every step skipped
    assert ("all 64 samples of the first 16 batches were skipped" if steps == 40 else "8 samples") in err
    assert not (run / "model").exists() and not (run / "checkpoints").exists()


_KILLED_SAVE = """
import sys, time, torch
from clipworks.train import state as run_state
run_dir, ready = sys.argv[1], sys.argv[2]
model = torch.nn.Linear(4, 4)
opt = torch.optim.AdamW(model.parameters())
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
real_save = torch.save

def slow_save(obj, f, *args, **kwargs):
    with open(f, "wb") as out:
        out.write(b"half of a checkpoint")  # a partial file, then the process dies mid-write
        out.flush()
    open(ready, "w").close()
    time.sleep(600)

torch.save = slow_save
run_state.save_checkpoint(run_dir, 2, model.state_dict(), opt.state_dict(), sched.state_dict(),
                          run_state.DataPosition())
"""


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    first = run_state.save_checkpoint(tmp_path, 1, *_states(model, opt, sched), run_state.DataPosition())
    ready = tmp_path / "writing"
    kill_when_ready([sys.executable, "-c", _KILLED_SAVE, str(tmp_path), str(ready)], ready, "started writing")
    assert any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())  # the torn write is there
    latest = run_state.latest_checkpoint(tmp_path)
    assert latest == first
    loaded = run_state.load_checkpoint(latest)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["weight"], model.weight.detach())


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_gradient_accumulation_keeps_the_contrastive_batch_whole(tmp_path, loss):
    """4 micro-batches with cached features give the update of the whole batch in one pass."""
    common = ["--run.steps", "2", "--run.save_every", "1", "--data.eval_size", "0", "--data.augment", "false",
              "--optim.lr", "1", "--optim.eps", "1", "--optim.warmup_steps", "0", "--loss.kind", loss]  # fmt: skip
    train(tiny_config(tmp_path / "whole", *common))
    train(tiny_config(tmp_path / "accum", *common, "--optim.accum_steps", "4"))
    whole = run_state.load_checkpoint(run_state.checkpoint_dir(tmp_path / "whole", 2))["model"]
    accum = run_state.load_checkpoint(run_state.checkpoint_dir(tmp_path / "accum", 2))["model"]
    before = run_state.load_checkpoint(run_state.checkpoint_dir(tmp_path / "whole", 1))["model"]
    assert max((whole[k] - before[k]).abs().max().item() for k in whole) > 1e-3
    for key, value in whole.items():
        torch.testing.assert_close(accum[key], value, atol=2e-6, rtol=1e-5, msg=key)
    # Micro-batches of 4 see only 3 negatives each: without the cache the update would differ.
    rows = list(csv.DictReader((tmp_path / "accum" / "metrics.csv").open()))
    first = list(csv.DictReader((tmp_path / "whole" / "metrics.csv").open()))
    assert rows[0]["loss"] == first[0]["loss"]


def _final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return run_state.load_checkpoint(run_state.checkpoint_dir(run_dir, step))["model"]


_STEPS = ["--run.steps", "2", "--data.eval_size", "0", "--data.augment", "false", "--optim.warmup_steps", "0"]


def test_gradient_checkpointing_gives_the_same_run(tmp_path):
    plain = train(tiny_config(tmp_path / "plain", *_STEPS))
    ckpt = train(tiny_config(tmp_path / "ckpt", *_STEPS, "--model.grad_checkpointing", "true"))
    assert ckpt.loss == pytest.approx(plain.loss, abs=1e-6)
    a, b = _final_weights(tmp_path / "plain", 2), _final_weights(tmp_path / "ckpt", 2)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)


def test_bf16_autocast_trains_and_keeps_fp32_weights(tmp_path):
    fp32 = train(tiny_config(tmp_path / "fp32", *_STEPS))
    bf16 = train(tiny_config(tmp_path / "bf16", *_STEPS, "--run.precision", "bf16"))
    assert math.isfinite(bf16.loss) and bf16.loss != fp32.loss  # computed in bf16: close, not equal
    assert bf16.loss == pytest.approx(fp32.loss, abs=0.05)
    weights = _final_weights(tmp_path / "bf16", 2)
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())


@pytest.mark.parametrize("locked", ["text", "image"])
def test_locked_tower_keeps_its_weights_in_the_loop(tmp_path, locked):
    cfg = tiny_config(tmp_path, *_STEPS, f"--model.lock_{locked}", "true")
    torch.manual_seed(cfg.run.seed)  # the loop seeds the same way before building the model
    initial = build_model(cfg.model)[0].state_dict()
    train(cfg)
    final = _final_weights(tmp_path, 2)
    prefix = "text." if locked == "text" else "visual."
    frozen = [k for k in final if k.startswith(prefix)]
    trained = [k for k in final if k.startswith("visual." if locked == "text" else "text.")]
    assert frozen and trained
    assert all(torch.equal(final[k], initial[k]) for k in frozen)
    assert any(not torch.equal(final[k], initial[k]) for k in trained)
