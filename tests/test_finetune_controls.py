"""Fine-tuning controls (issue 19): patch dropout, partial tower unlocking, the sigmoid loss on any model, and
distillation from a teacher."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

import clipworks
from clipworks.config import CLIPConfig, ResNetConfig, TextConfig, VisionTransformerConfig
from clipworks.models.clip import CLIP
from clipworks.train.config import load_config
from clipworks.train.distributed import setup_distributed
from clipworks.train.loop import Runner, add_siglip_bias, build_model, train
from clipworks.train.losses import ClipLoss

# 32 px images in 8 px patches: 16 patch tokens and a class token; two blocks per tower.
TINY = ["--model.embed_dim", "32", "--model.image_size", "32", "--model.patch_size", "8",
        "--model.vision_width", "32", "--model.vision_layers", "2", "--model.vision_heads", "2",
        "--model.text_width", "32", "--model.text_layers", "2", "--model.text_heads", "2",
        "--data.train", "synthetic:shapes?size=256&seed=0&image_size=32", "--data.batch_size", "16",
        "--data.workers", "0", "--data.eval_size", "0", "--data.augment", "false", "--optim.warmup_steps", "0",
        "--run.progress", "false", "--run.tensorboard", "false", "--run.log_every", "1",
        "--run.steps", "2"]  # fmt: skip


def tiny_config(out_dir: Path, *extra: str):
    return load_config(None, [*TINY, "--run.out_dir", str(out_dir), *extra])


def tiny_clip(seed: int = 0, image_size: int = 32) -> CLIP:
    torch.manual_seed(seed)
    vision = VisionTransformerConfig(image_size=image_size, patch_size=8, width=32, layers=2, heads=2)
    return clipworks.create_model(CLIPConfig(32, vision, TextConfig(context_length=20, width=32, layers=2, heads=2)))


def _first_block_inputs(model: CLIP, images: torch.Tensor) -> torch.Tensor:
    """The token sequence the image tower's first block sees."""
    seen = []
    hook = model.visual.transformer.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        model.encode_image(images)
    finally:
        hook.remove()
    return seen[0]


def _rows(tokens: torch.Tensor, full: torch.Tensor) -> list[int]:
    """Which rows of `full` (N, D) the rows of `tokens` (K, D) are."""
    return torch.cdist(tokens, full).argmin(dim=1).tolist()


# --- patch dropout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.99])
def test_patch_dropout_drops_the_fraction_in_training_only(fraction):
    model = tiny_clip()
    images = torch.randn(3, 3, 32, 32)
    model.set_patch_dropout(fraction)
    assert _first_block_inputs(model.eval(), images).shape[1] == 17
    kept = max(1, int(16 * (1 - fraction)))  # OpenCLIP's PatchDropout count
    assert _first_block_inputs(model.train(), images).shape[1] == 1 + kept
    model.set_patch_dropout(0.0)
    assert _first_block_inputs(model.train(), images).shape[1] == 17


def test_patch_dropout_keeps_the_class_token_and_draws_per_image():
    model = tiny_clip()
    image = torch.randn(1, 3, 32, 32)
    images = image.expand(8, -1, -1, -1)  # the same image eight times: only the draws differ
    full = _first_block_inputs(model.eval(), image)[0]  # (17, D)
    model.set_patch_dropout(0.5)
    with torch.no_grad():
        dropped = _first_block_inputs(model.train(), images)  # (8, 9, D)
    kept = [_rows(x, full) for x in dropped]
    assert all(k[0] == 0 and 0 not in k[1:] and len(set(k)) == 9 for k in kept)  # class token first, patches distinct
    torch.testing.assert_close(dropped[:, 1:], full[torch.tensor([k[1:] for k in kept])])  # rows are whole tokens
    assert len({frozenset(k) for k in kept}) > 1


def test_patch_dropout_leaves_evaluation_unchanged():
    model = tiny_clip().eval()
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 400, (4, 20))
    before = model(images, tokens)
    model.set_patch_dropout(0.75)
    after = model(images, tokens)
    assert torch.equal(before.image_features, after.image_features)
    model.train()
    assert not torch.allclose(model(images, tokens).image_features, before.image_features)


def test_patch_dropout_through_open_clip_keyword_and_refusals():
    vision = VisionTransformerConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2)
    cfg = CLIPConfig(32, vision, TextConfig(context_length=20, width=32, layers=1, heads=2))
    model = clipworks.create_model(cfg, force_patch_dropout=0.5)
    assert model.visual.patch_dropout == 0.5 and not model.training
    assert _first_block_inputs(model.train(), torch.randn(2, 3, 32, 32)).shape[1] == 9
    with pytest.raises(ValueError, match=r"0 <= fraction < 1"):
        model.set_patch_dropout(1.0)
    resnet = CLIPConfig(32, ResNetConfig(image_size=32, layers=(1, 1, 1, 1), width=8, heads=2), cfg.text)
    with pytest.raises(ValueError, match="only ViT image towers.*ModifiedResNet"):
        clipworks.create_model(resnet, force_patch_dropout=0.5)
    clipworks.create_model(resnet, force_patch_dropout=0.0).set_patch_dropout(0)  # 0 is fine anywhere


def test_gradient_cache_replays_the_patch_draws(tmp_path):
    """With optim.accum_steps, each micro-batch runs twice (without, then with gradients): both runs must drop the
    same patches, or the cached features' gradients do not belong to the recomputed ones."""
    cfg = tiny_config(tmp_path, "--model.patch_dropout", "0.5", "--optim.accum_steps", "2")
    runner = Runner(cfg, setup_distributed("cpu"), tmp_path)
    seen = []
    runner.model.visual.transformer.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    images, tokens = torch.randn(8, 3, 32, 32), torch.randint(1, 400, (8, 20))
    with torch.no_grad():
        full = _first_block_inputs(runner.model.eval(), images)
    seen.clear()
    runner.model.train()
    loss, backward = runner._cached_loss(images, tokens)
    backward()
    assert len(seen) == 4 and seen[0].shape == (4, 9, 32)
    torch.testing.assert_close(seen[2], seen[0])  # micro-batch 0, cached then recomputed
    torch.testing.assert_close(seen[3], seen[1])
    assert not torch.equal(seen[0], full[:4, :9])


# --- partial unlocking --------------------------------------------------------------------------------------


def _groups(tower) -> list[list[torch.nn.Parameter]]:
    out = []
    for group in tower.lock_groups():
        params = []
        for part in group:
            if isinstance(part, torch.nn.Parameter):
                params.append(part)
            elif part is not None:
                params.extend(part.parameters())
        out.append(params)
    return out


def test_partial_unlocking_gets_gradients_only_in_the_top_groups(tmp_path):
    cfg = tiny_config(tmp_path, "--model.lock_image", "true", "--model.lock_image_unlocked_groups", "2",
                      "--model.lock_text", "true", "--model.lock_text_unlocked_layers", "1")  # fmt: skip
    torch.manual_seed(cfg.run.seed)  # the loop seeds the same way before building the model
    model, _ = build_model(cfg.model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(torch.randn(4, 3, 32, 32), torch.randint(1, 400, (4, 20)))
    ClipLoss()(out.image_features, out.text_features, out.logit_scale).backward()
    image, text = _groups(model.visual), _groups(model.text)
    assert len(image) == 4 and len(text) == 4  # embeddings, block 0, block 1 with the final norm, projection
    for groups, unlocked in ((image, 2), (text, 1)):
        assert all(p.grad is None and not p.requires_grad for g in groups[:-unlocked] for p in g)
        assert all(p.grad is not None for g in groups[-unlocked:] for p in g)
    train(cfg)
    final = clipworks.create_model(f"local-dir:{tmp_path / 'model'}").state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    for groups, unlocked in ((image, 2), (text, 1)):
        locked = [names[id(p)] for g in groups[:-unlocked] for p in g]
        trained = [names[id(p)] for g in groups[-unlocked:] for p in g]
        assert all(torch.equal(final[n], initial[n]) for n in locked)
        assert all(not torch.equal(final[n], initial[n]) for n in trained)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.lock_image_unlocked_groups", "1"], "need model.lock_image true"),
        (["--model.lock_image_freeze_bn_stats", "true"], "need model.lock_image true"),
        (["--model.lock_text_unlocked_layers", "2"], "needs model.lock_text true"),
        (["--model.lock_text", "true", "--model.lock_text_freeze_layer_norm", "false"], "expected true"),
        (["--loss.distill_model", "local-dir:x", "--loss.kind", "siglip"], "needs loss.kind clip"),
        (["--loss.distill_model", "local-dir:x", "--loss.chunk_size", "8"], "chunk_size none"),
    ],
)
def test_settings_that_need_another_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(Path("unused"), *overrides)


# --- the sigmoid loss on any model -------------------------------------------------------------------------


def test_siglip_bias_from_scratch_starts_as_siglip():
    model = tiny_clip()
    add_siglip_bias(model, pretrained=False)
    assert model.logit_bias.item() == -10.0 and model.logit_scale.item() == pytest.approx(math.log(10))
    assert model.config.init_logit_bias == -10.0 and model.config.init_logit_scale == pytest.approx(math.log(10))
    assert any(p is model.logit_bias for p in model.parameters())


def test_siglip_loss_on_a_model_without_bias_trains_and_reloads(tmp_path):
    teacherless = tiny_clip(seed=3)
    clipworks.save_pretrained(teacherless, tmp_path / "clip")
    cfg = tiny_config(tmp_path / "run", "--model.name", f"local-dir:{tmp_path / 'clip'}", "--loss.kind", "siglip",
                      "--model.patch_dropout", "0.5")  # fmt: skip
    model, _ = build_model(cfg.model, cfg.loss.kind)
    assert model.visual.patch_dropout == 0.5
    # pretrained weights: the learned scale is kept and the bias starts at 0 (OpenCLIP's load_checkpoint)
    assert model.logit_bias.item() == 0.0 and model.logit_scale.item() == teacherless.logit_scale.item()
    result = train(cfg)
    assert math.isfinite(result.loss)
    reloaded = clipworks.create_model(f"local-dir:{tmp_path / 'run' / 'model'}")
    assert reloaded.logit_bias is not None and reloaded.config.init_logit_bias == -10.0
    assert reloaded.logit_bias.item() != 0.0  # it was trained and saved
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 400, (2, 20))
    assert len(reloaded(images, tokens)) == 4  # a SigLIPOutput


# --- distillation -------------------------------------------------------------------------------------------


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "t"
    clipworks.save_pretrained(tiny_clip(seed=7), path)
    return path


def test_distillation_adds_the_teacher_term(tmp_path, teacher_dir):
    plain = _metrics(train(tiny_config(tmp_path / "plain")).run_dir)
    spec = f"local-dir:{teacher_dir}"
    rows = _metrics(train(tiny_config(tmp_path / "distill", "--loss.distill_model", spec)).run_dir)
    first = {k: float(v) for k, v in rows[0].items() if v}
    # the same model, data and first batch: the contrastive part is the plain run's loss, the teacher adds to it
    assert first["contrastive_loss"] == pytest.approx(float(plain[0]["loss"]), abs=1e-5)
    assert first["distill_loss"] > 0
    assert first["loss"] == pytest.approx(first["contrastive_loss"] + first["distill_loss"], rel=1e-5)
    assert float(rows[1]["loss"]) != pytest.approx(float(plain[1]["loss"]), abs=1e-4)
    accum = _metrics(train(tiny_config(tmp_path / "accum", "--loss.distill_model", spec, "--optim.accum_steps",
                                       "2")).run_dir)  # fmt: skip
    for a, b in zip(accum, rows):  # GradCache: the same loss, and the same update
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-4)


def test_distillation_teacher_must_see_the_students_images(tmp_path):
    clipworks.save_pretrained(tiny_clip(image_size=64), tmp_path / "t64")
    cfg = tiny_config(tmp_path / "run", "--loss.distill_model", f"local-dir:{tmp_path / 't64'}")
    with pytest.raises(ValueError, match=r"\(size, mean, std\) \(64, .*the student as \(32, "):
        train(cfg)
    cfg = tiny_config(tmp_path / "run", "--loss.distill_model", "ViT-B-32")
    with pytest.raises(ValueError, match="require_pretrained"):
        train(cfg)
