"""Test helpers: tiny configs of every preset and reduced-size reference (OpenCLIP) models."""

from __future__ import annotations

from dataclasses import replace

import torch

from clipworks.config import CLIPConfig


def tiny_config(cfg: CLIPConfig) -> CLIPConfig:
    """The same architecture family and variant flags as `cfg`, at a size a test can run in milliseconds."""
    v = cfg.vision
    if v.kind == "vit":
        vision = replace(v, image_size=32, patch_size=8 if v.patch_size < 16 else 16, width=32, heads=2, layers=2)
        embed = 32 if not v.projection else 24
    elif v.kind == "resnet":
        vision = replace(v, image_size=64, layers=(1, 1, 1, 1), width=8, heads=8 * 32 // 64)
        embed = 24
    else:
        vision = replace(v, image_size=64, depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))
        embed = 24
    text = replace(cfg.text, width=32, heads=2, layers=2, vocab_size=min(cfg.text.vocab_size, 49408))
    return replace(cfg, embed_dim=embed, vision=vision, text=text)


def open_clip_meta_model(name: str):
    """OpenCLIP's full-size model for a preset name, on the meta device (no memory, no init cost)."""
    import open_clip

    cfg = open_clip.factory.get_model_config(name)
    cls = open_clip.model.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.model.CLIP
    with torch.device("meta"):
        return cls(**cfg)


def perturb_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Random values in every parameter and normalisation buffer, so that no wrong key map can pass by
    accident (freshly initialised LayerNorms are all ones and zeros; BatchNorm stats are zeros and ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():  # persistent tensors only (not e.g. a causal mask)
            if not t.is_floating_point():
                continue
            if "running_var" in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * std + (1.0 if name.endswith("ln_1.weight") else 0.0))


def open_clip_model(cfg: CLIPConfig):
    """A randomly initialised OpenCLIP model with the architecture `cfg` describes (reduced sizes welcome).

    OpenCLIP builds ConvNeXt and SigLIP image towers through timm by model name only, so for those the
    timm trunk is swapped for one of the requested size; the wrapper, its key layout and the text tower
    remain OpenCLIP's.
    """
    import timm
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    v, t = cfg.vision, cfg.text
    quick_gelu = t.act == "quick_gelu"
    text = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                       layers=t.layers, mlp_ratio=t.mlp_ratio)  # fmt: skip
    if v.kind == "vit" and v.pool == "cls":
        vision = CLIPVisionCfg(layers=v.layers, width=v.width, head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio,
                               patch_size=v.patch_size, image_size=v.image_size)  # fmt: skip
        return CLIP(cfg.embed_dim, vision, text, quick_gelu=quick_gelu)
    if v.kind == "resnet":
        vision = CLIPVisionCfg(layers=list(v.layers), width=v.width, image_size=v.image_size, patch_size=None)
        return CLIP(cfg.embed_dim, vision, text, quick_gelu=quick_gelu)
    if v.kind == "convnext":
        vision = CLIPVisionCfg(timm_model_name="convnext_base", timm_pool="", timm_proj="linear",
                               image_size=v.image_size)  # fmt: skip
        model = CLIP(cfg.embed_dim, vision, text, quick_gelu=quick_gelu)
        model.visual.trunk = timm.create_model("convnext_base", depths=v.depths, dims=v.dims, num_classes=0)
        model.visual.head.proj = torch.nn.Linear(v.dims[-1], cfg.embed_dim, bias=False)
        return model
    # SigLIP: timm ViT with attention-pool head, OpenCLIP's bidirectional text tower pooled at the last token
    vision = CLIPVisionCfg(timm_model_name="vit_base_patch16_siglip_224", timm_pool="map", timm_proj="none",
                           image_size=224)  # fmt: skip
    text = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                       layers=t.layers, no_causal_mask=True, proj_bias=True, pool_type="last",
                       norm_kwargs={"eps": t.norm_eps})  # fmt: skip
    model = CustomTextCLIP(cfg.embed_dim, vision, text, init_logit_bias=cfg.init_logit_bias)
    model.visual.trunk = timm.create_model(
        "vit_base_patch16_siglip_224", depth=v.layers, embed_dim=v.width, num_heads=v.heads, img_size=v.image_size,
        num_classes=0, global_pool="map",
    )  # fmt: skip
    return model
