"""The modified-ResNet and ConvNeXt image towers: parity with OpenCLIP, full-size shapes, checkpointing."""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipworks.config import ConvNeXtConfig, ResNetConfig
from clipworks.models import convnext, resnet
from clipworks.models.convnext import ConvNeXt
from clipworks.models.resnet import ModifiedResNet

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

EMBED_DIM = 32
# Two blocks in some stages so both the first (downsampling) and later blocks are covered.
TINY_RESNET = ResNetConfig(image_size=64, layers=(2, 1, 2, 1), width=16, heads=8)
TINY_CONVNEXT = ConvNeXtConfig(image_size=64, depths=(2, 1, 2, 1), dims=(16, 32, 64, 128))
TOWERS = {"resnet": (ModifiedResNet, TINY_RESNET, resnet), "convnext": (ConvNeXt, TINY_CONVNEXT, convnext)}


def reference_resnet(cfg: ResNetConfig) -> nn.Module:
    vision = open_clip.model.CLIPVisionCfg(
        layers=list(cfg.layers), width=cfg.width, head_width=cfg.width * 32 // cfg.heads, image_size=cfg.image_size
    )
    return open_clip.model.CLIP(EMBED_DIM, vision, _tiny_text()).visual


def reference_convnext(cfg: ConvNeXtConfig) -> nn.Module:
    """OpenCLIP's convnext_base_w tower, shrunk by passing depths/dims into timm's `convnext_base` entry point,
    so every other choice (channels-last LayerNorm + Linear MLP, layer scale, eps, head) is convnext_base's."""
    create_model = timm.create_model

    def reduced(name, **kwargs):
        assert name == "convnext_base"
        return create_model(name, depths=cfg.depths, dims=cfg.dims, **kwargs)

    vision = open_clip.model.CLIPVisionCfg(
        timm_model_name="convnext_base", timm_pool="", timm_proj="linear", image_size=cfg.image_size
    )
    with mock.patch.object(timm, "create_model", reduced):
        return open_clip.model.CLIP(EMBED_DIM, vision, _tiny_text()).visual


def _tiny_text():
    return open_clip.model.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)


@torch.no_grad()
def perturb(model: nn.Module) -> None:
    """Move every weight and statistic off its init, so zero gains and unit norms cannot hide a mismatch.

    Conv and linear weights get variance-preserving scales: timm's N(0, 0.02) leaves pre-activations so
    small that GELU's tanh approximation would pass for the exact one.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.normal_(0, m.weight[0].numel() ** -0.5)
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    for name, p in model.named_parameters():
        if name.endswith(("gamma", "layer_scale")):
            p.uniform_(0.5, 1.5)


def reference(kind: str) -> nn.Module:
    torch.manual_seed(0)
    ref = reference_resnet(TINY_RESNET) if kind == "resnet" else reference_convnext(TINY_CONVNEXT)
    perturb(ref)
    return ref.eval()


@pytest.mark.parametrize("kind", TOWERS)
def test_parity_with_open_clip(kind):
    cls, cfg, module = TOWERS[kind]
    ref = reference(kind)
    ours = cls(cfg, EMBED_DIM).eval()
    ours.load_state_dict(module.convert_from_open_clip(ref.state_dict()), strict=True)
    # an eps of 1e-5 instead of 1e-6 moves the features by less than the tolerance, so compare it directly
    assert {m.eps for m in ours.modules() if isinstance(m, nn.LayerNorm)} == {
        m.eps for m in ref.modules() if isinstance(m, nn.LayerNorm)
    }
    images = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = ref(images), ours(images)
    assert actual.shape == (3, EMBED_DIM)
    assert (F.normalize(actual, dim=-1) - F.normalize(expected, dim=-1)).abs().max() <= 1e-5
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", TOWERS)
def test_converters_are_inverses(kind):
    cls, cfg, module = TOWERS[kind]
    sd = reference(kind).state_dict()
    back = module.convert_to_open_clip(module.convert_from_open_clip(sd))
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # and the other way: our keys exported load strictly into OpenCLIP's tower
    ours = cls(cfg, EMBED_DIM).state_dict()
    assert module.convert_from_open_clip(module.convert_to_open_clip(ours)).keys() == ours.keys()
    reference(kind).load_state_dict(module.convert_to_open_clip(ours), strict=True)


def test_converter_rejects_unknown_keys():
    for module in (resnet, convnext):
        with pytest.raises(ValueError, match="transformer.x"):
            module.convert_from_open_clip({"transformer.x": torch.zeros(1)})


def _preset(name: str) -> tuple[ResNetConfig | ConvNeXtConfig, int]:
    model_cfg = open_clip.get_model_config(name)
    v = model_cfg["vision_cfg"]
    if name == "convnext_base_w":
        assert v["timm_model_name"] == "convnext_base" and v["timm_pool"] == "" and v["timm_proj"] == "linear"
        return ConvNeXtConfig(image_size=v["image_size"]), model_cfg["embed_dim"]
    heads = v["width"] * 32 // 64  # OpenCLIP's default head_width
    return ResNetConfig(v["image_size"], tuple(v["layers"]), v["width"], heads), model_cfg["embed_dim"]


@pytest.mark.parametrize("name", ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "convnext_base_w"])
def test_full_size_matches_open_clip(name):
    cfg, embed_dim = _preset(name)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ref = open_clip.create_model(name, device="meta").visual
        ours = (ConvNeXt if isinstance(cfg, ConvNeXtConfig) else ModifiedResNet)(cfg, embed_dim)
    assert next(ref.parameters()).is_meta and next(ours.parameters()).is_meta

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(ours) == count(ref)
    module = convnext if isinstance(cfg, ConvNeXtConfig) else resnet
    converted = {k: v.shape for k, v in module.convert_from_open_clip(ref.state_dict()).items()}
    assert converted == {k: v.shape for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("kind", TOWERS)
def test_grad_checkpointing_same_output_and_grads(kind):
    cls, cfg, module = TOWERS[kind]
    if kind == "convnext":  # checkpointing must replay the same drop-path masks
        cfg = dataclasses.replace(cfg, drop_path=0.5)
    torch.manual_seed(0)
    plain = cls(cfg, EMBED_DIM)
    perturb(plain)
    ckpt = cls(cfg, EMBED_DIM)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    images = torch.randn(4, 3, cfg.image_size, cfg.image_size)
    target = torch.randn(4, EMBED_DIM)

    outputs = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(1)
        with mock.patch.object(module, "checkpoint", wraps=module.checkpoint) as spy:
            out = model(images)
            (out * target).sum().backward()
        assert spy.call_count == (sum(cfg.layers if kind == "resnet" else cfg.depths) if model is ckpt else 0)
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    # recomputation must not update BatchNorm statistics a second time
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=name)
    # checkpointing is a training-only memory trade: eval runs the plain path
    ckpt.eval()
    with torch.no_grad():
        torch.testing.assert_close(ckpt(images), plain.eval()(images), rtol=0, atol=0)


def test_init():
    rn = ModifiedResNet(TINY_RESNET, EMBED_DIM)
    assert all((b.bn3.weight == 0).all() for stage in rn.stages for b in stage)
    cn = ConvNeXt(TINY_CONVNEXT, EMBED_DIM)
    assert all((b.layer_scale == TINY_CONVNEXT.layer_scale_init).all() for s in cn.stages for b in s.blocks)


def test_resnet_rejects_bad_image_size():
    with pytest.raises(ValueError, match="multiple of 32"):
        ModifiedResNet(ResNetConfig(image_size=100), EMBED_DIM)
