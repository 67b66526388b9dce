"""CLIP guidance: preprocessing inside the graph, the spherical distance, and a few steps that lower the loss."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from clipworks.conditioning import CLIPGuidance, image_features, preprocess_pixels, spherical_distance
from clipworks.config import PreprocessConfig
from clipworks.factory import create_model
from clipworks.presets import get_preset
from clipworks.tokenizer import default_tokenizer
from reference import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(tiny_config(get_preset("ViT-B-32")))


def test_pixels_at_size_are_only_normalised(model):
    cfg = PreprocessConfig(image_size=32)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = preprocess_pixels(pixels, cfg)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    assert torch.allclose(x, (pixels - mean) / std)
    assert torch.allclose(image_features(model, pixels, cfg), model.encode_image(x, normalize=True))


@pytest.mark.parametrize(
    "mode,interpolation", [("shortest", "bicubic"), ("squash", "bilinear"), ("longest", "nearest")]
)
def test_resize_modes_give_the_model_size_and_gradients(mode, interpolation):
    cfg = PreprocessConfig(image_size=32, resize_mode=mode, interpolation=interpolation, fill_color=255)
    pixels = torch.rand(1, 3, 40, 72, requires_grad=True)
    x = preprocess_pixels(pixels, cfg)
    assert x.shape == (1, 3, 32, 32)
    x.sum().backward()
    assert pixels.grad.abs().sum() > 0
    if mode == "shortest":  # the centre crop: columns far left and right get no gradient
        assert not pixels.grad[..., :8].any() and pixels.grad[..., 30:40].abs().sum() > 0
    if mode == "longest":  # 40x72 -> 17x32, padded with white above and below
        white = (1 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
        assert torch.allclose(x[0, :, 0, 0], white)


def test_bad_pixels_and_modes_are_named():
    with pytest.raises(ValueError, match=r"pixels must be \(B, 3, H, W\)"):
        preprocess_pixels(torch.rand(3, 32, 32), PreprocessConfig(image_size=32))
    with pytest.raises(ValueError, match="resize_mode 'fit'"):
        preprocess_pixels(torch.rand(1, 3, 32, 32), replace(PreprocessConfig(image_size=32), resize_mode="fit"))


def test_spherical_distance_is_half_the_squared_angle():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [-1.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(spherical_distance(a, b), torch.tensor([(math.pi / 2) ** 2 / 2, math.pi**2 / 2, 0.0]))


def test_a_few_gradient_steps_lower_the_guidance_loss(model):
    with torch.no_grad():
        text = model.encode_text(default_tokenizer()("a red circle"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guidance = CLIPGuidance(model, text[0])
    pixels = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0)).requires_grad_()
    optimiser = torch.optim.Adam([pixels], lr=0.05)
    losses = []
    for _ in range(5):
        loss = guidance(pixels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is only read


def test_example_script_lowers_the_loss(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "clip_guidance.py"
    spec = importlib.util.spec_from_file_location("clip_guidance_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.main(["--steps", "4", "--size", "64", "--out", str(tmp_path / "out.png")])
    assert losses[-1] < losses[0]
    assert (tmp_path / "out.png").stat().st_size > 0 and "guidance loss" in capsys.readouterr().out
