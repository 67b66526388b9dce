"""BatchNorm folding and channels-last for inference (issue 22): same features, idempotent, not trainable."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clipworks
from clipworks.config import CLIPConfig, ConvNeXtConfig, ResNetConfig, TextConfig
from clipworks.models.convnext import ConvNeXt
from clipworks.models.fold import FoldedBatchNorm, fold_batchnorm, optimize_for_inference
from clipworks.models.resnet import ModifiedResNet

EMBED_DIM = 32
# two blocks in some stages: both the downsampling first block and plain later ones
TINY_RESNET = ResNetConfig(image_size=64, layers=(2, 1, 2, 1), width=16, heads=8)
TINY_CONVNEXT = ConvNeXtConfig(image_size=64, depths=(2, 1, 2, 1), dims=(16, 32, 64, 128))
# stem 3 + 3 per block + one shortcut BN per stage (each first block widens or strides)
RESNET_BNS = 3 + 3 * sum(TINY_RESNET.layers) + 4


@torch.no_grad()
def perturbed(tower: nn.Module) -> nn.Module:
    """Every weight and BatchNorm statistic moved off its init, so that no BN folds as the identity (a zero
    bn3 gain would hide a wrong fold of its block entirely)."""
    torch.manual_seed(0)
    for m in tower.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.normal_(0, m.weight[0].numel() ** -0.5)
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.3, 2.0)
    return tower.eval()


def resnet() -> ModifiedResNet:
    return perturbed(ModifiedResNet(TINY_RESNET, EMBED_DIM))


def convnext() -> ConvNeXt:
    return perturbed(ConvNeXt(TINY_CONVNEXT, EMBED_DIM))


def images(batch: int = 3, side: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


def assert_same_features(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert (F.normalize(actual, dim=-1) - F.normalize(expected, dim=-1)).abs().max() <= 1e-5
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_fold_resnet_same_features():
    plain = resnet()
    folded = copy.deepcopy(plain)
    assert fold_batchnorm(folded) == RESNET_BNS
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(m.bias is not None for m in folded.modules() if isinstance(m, nn.Conv2d))
    x = images()
    expected = plain(x)
    assert_same_features(folded(x), expected)
    # and the unfolded model was left alone: folding works on its own copy
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == RESNET_BNS


@torch.no_grad()
def test_fold_is_idempotent():
    folded = resnet()
    fold_batchnorm(folded)
    x = images()
    once = folded(x)
    assert fold_batchnorm(folded) == 0
    torch.testing.assert_close(folded(x), once, rtol=0, atol=0)


def test_fold_puts_model_in_eval_and_refuses_training():
    model = ModifiedResNet(TINY_RESNET, EMBED_DIM).train()
    assert fold_batchnorm(model) == RESNET_BNS
    assert not model.training and not any(m.training for m in model.modules())
    with pytest.raises(RuntimeError, match="inference only"):
        model.train()
    model.eval()  # still allowed
    with pytest.raises(RuntimeError, match="training mode"):  # a flag set by hand is caught at forward
        for m in model.modules():
            m.training = True
        model(images(1))


@torch.no_grad()
def test_fold_whole_clip_model_and_leaves_transformers_alone():
    text = TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    model = clipworks.create_model(CLIPConfig(EMBED_DIM, TINY_RESNET, text))
    perturbed(model.visual)
    plain = copy.deepcopy(model)
    assert fold_batchnorm(model) == RESNET_BNS
    x = images(2)
    torch.testing.assert_close(model.encode_image(x, normalize=True), plain.encode_image(x, normalize=True),
                               rtol=0, atol=1e-5)  # fmt: skip
    tokens = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(model.encode_text(tokens), plain.encode_text(tokens), rtol=0, atol=0)


@torch.no_grad()
def test_convnext_has_no_batchnorm_to_fold():
    # ConvNeXt normalises with LayerNorm, whose statistics come from each input: nothing to fold; channels-last
    # is what applies to it (below).
    model = convnext()
    x = images()
    expected = model(x)
    assert fold_batchnorm(model) == 0
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@torch.no_grad()
def test_optimize_for_inference_channels_last_same_features():
    plain = resnet()
    fast = optimize_for_inference(copy.deepcopy(plain))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x = images()
    expected = plain(x)
    out = fast(x)
    assert_same_features(out, expected)
    # idempotent
    optimize_for_inference(fast)
    torch.testing.assert_close(fast(x), out, rtol=0, atol=0)
    # channels-last input too (a caller's tensor may already be)
    assert_same_features(fast(x.contiguous(memory_format=torch.channels_last)), expected)


@torch.no_grad()
def test_convnext_channels_last_same_features_but_left_alone_by_optimize():
    plain = convnext()
    x = images()
    expected = plain(x)
    same = optimize_for_inference(copy.deepcopy(plain))  # measured no faster: not converted
    assert all(m.weight.is_contiguous() for m in same.modules() if isinstance(m, nn.Conv2d))
    torch.testing.assert_close(same(x), expected, rtol=0, atol=0)
    # the layout still works (the benchmark times it): per-pixel LayerNorm and MLP on contiguous (B, H, W, D)
    cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    assert_same_features(cl(x), expected)


@torch.no_grad()
def test_optimize_without_channels_last_only_folds():
    fast = optimize_for_inference(resnet(), channels_last=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, FoldedBatchNorm) for m in fast.modules())
    conv = fast.stem.conv2
    assert conv.weight.is_contiguous()


def test_unfolded_model_still_trains_the_same():
    # the in-place ReLU / sum of the forward pass must leave autograd intact
    model = resnet().train()
    out = model(images(4))
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
