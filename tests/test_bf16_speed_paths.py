"""The CPU speed paths of issue 22: the residual-fused block forward (float32 unchanged), `prepack_linears` (oneDNN
products with fused bias, GELU and residual adds, LayerNorm affines folded) and `compile_for_inference`."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from reference import tiny_config

import clipworks
from clipworks.models.fast import (
    PackedLinear, PackedPatchEmbed, compile_for_inference, packed_linears_available, prepack_linears,
)  # fmt: skip
from clipworks.models.layers import Block
from clipworks.models.precision import apply_precision

needs_onednn = pytest.mark.skipif(not packed_linears_available(), reason="no oneDNN bf16 linear ops in this torch")


def _model(name="ViT-B-32", act=None, width=64) -> clipworks.CLIP:
    cfg = tiny_config(clipworks.get_preset(name))
    vision, text = replace(cfg.vision, width=width, heads=4), replace(cfg.text, width=width, heads=4)
    if act is not None:
        vision, text = replace(vision, act=act), replace(text, act=act)
    torch.manual_seed(0)
    return clipworks.create_model(replace(cfg, vision=vision, text=text), load_weights=False).eval()


def _inputs(model):
    torch.manual_seed(1)
    S = model.visual.config.image_size
    tokens = torch.randint(1, 400, (4, 12))
    tokens[:, 7] = 49407  # the end token (argmax pooling), then padding the trim drops
    return torch.randn(4, 3, S, S), tokens


def test_block_forward_is_the_unfused_formula_exactly_in_fp32():
    torch.manual_seed(0)
    block = Block(64, 4, 4.0, "gelu", 1e-5).eval()
    x = torch.randn(3, 9, 64)
    with torch.no_grad():
        y = x + block.attn(block.ln_1(x), causal=True)
        want = y + block.mlp(block.ln_2(y))
        assert torch.equal(block(x, causal=True), want)
        index = torch.tensor([8, 2, 5])
        # the one-row path (other product shapes: equal to rounding)
        torch.testing.assert_close(block.forward_one(x, index, causal=True), want[torch.arange(3), index])


@needs_onednn
def test_packed_linear_matches_the_bf16_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96).bfloat16()
    packed = PackedLinear(layer)
    x, residual = torch.randn(2, 5, 64).bfloat16(), torch.randn(2, 5, 96).bfloat16()
    with torch.no_grad():
        want = layer(x).float()
        torch.testing.assert_close(packed(x).float(), want, atol=0.03, rtol=0.02)
        torch.testing.assert_close(packed.forward_add(x, residual).float(), want + residual.float(), atol=0.05,
                                   rtol=0.02)  # fmt: skip
        torch.testing.assert_close(packed.forward_rows(x, 10, 40).float(), want[..., 10:40], atol=0.03, rtol=0.02)
        gelu = PackedLinear(layer, ("gelu", "none"))(x).float()
        torch.testing.assert_close(gelu, F.gelu(want), atol=0.03, rtol=0.02)


@needs_onednn
@pytest.mark.parametrize("act", [None, "quick_gelu", "gelu_tanh"])
def test_prepacked_bf16_model_keeps_its_features(act):
    model = _model(act=act)
    images, tokens = _inputs(model)
    bf16 = copy.deepcopy(model)
    apply_precision(bf16, "bf16")
    packed = copy.deepcopy(bf16)
    blocks = len(model.visual.transformer.blocks) + len(model.text.transformer.blocks)
    assert prepack_linears(packed) == 4 * blocks + 1  # and the patch embedding
    assert isinstance(packed.visual.patch_embed, PackedPatchEmbed)
    assert not any(p.requires_grad for p in packed.parameters())
    with torch.inference_mode():
        for encode in ("encode_image", "encode_text"):
            x = images if encode == "encode_image" else tokens
            want, got = getattr(model, encode)(x, normalize=True), getattr(packed, encode)(x, normalize=True)
            assert got.dtype == torch.float32
            assert F.cosine_similarity(got, want).min() > 0.999, encode
            # as close to fp32 as the plain bf16 model is (the folded LayerNorm affine rounds once, not twice)
            plain = getattr(bf16, encode)(x, normalize=True)
            assert (got - want).abs().max() < 2 * (plain - want).abs().max() + 1e-3


@needs_onednn
@pytest.mark.parametrize("size", [64, 70])  # 70: pixels past the last whole patch are not seen, as the convolution's
def test_packed_patch_embedding_is_the_convolution(size):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 48, 16, stride=16).bfloat16()
    packed = PackedPatchEmbed(conv)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = F.conv2d(images.bfloat16().float(), conv.weight.float(), conv.bias.float(), stride=16)  # exact sums
        got = packed(images)  # float32 pixels: cast as they are laid out
        assert got.shape == want.shape == (2, 48, 4, 4) and got.dtype == torch.bfloat16
        # each output rounded once to bf16 from its float32 sum: within half a bf16 step (2^-8 relative) of exact
        assert ((got.float() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()
        assert torch.equal(got, packed(images.bfloat16()))
    with pytest.raises(ValueError, match="kernel == stride"):
        PackedPatchEmbed(torch.nn.Conv2d(3, 8, 3, stride=1).bfloat16())


@needs_onednn
def test_prepack_needs_a_low_precision_model():
    with pytest.raises(ValueError, match="bf16"):
        prepack_linears(_model())


@needs_onednn
def test_compiled_model_equals_the_eager_one_within_bf16_tolerance():
    model = _model(width=32)
    apply_precision(model, "bf16")
    images, tokens = _inputs(model)
    with torch.inference_mode():
        want = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
        compile_for_inference(model)
        got = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
    for w, g in zip(want, got):
        assert F.cosine_similarity(g, w).min() > 0.999
