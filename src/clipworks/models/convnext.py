"""ConvNeXt image tower (Liu et al. 2022) as OpenCLIP builds it from timm, with a linear projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from clipworks.config import ConvNeXtConfig
from clipworks.models.keymap import KeyMap, Rule


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class Block(nn.Module):
    """Depthwise 7x7 conv -> LayerNorm -> MLP (4x, GELU) -> layer scale -> drop path, plus the input."""

    def __init__(self, width: int, drop_path: float, layer_scale_init: float, eps: float):
        super().__init__()
        self.conv_dw = nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        self.layer_scale = nn.Parameter(torch.full((width,), layer_scale_init))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # (B, H, W, D): norm and MLP act on the last dim
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))) * self.layer_scale
        y = y.permute(0, 3, 1, 2)  # (B, D, H, W)
        return x + _drop_path(y, self.drop_path, self.training)


class Stage(nn.Module):
    """An optional 2x downsample (LayerNorm + 2x2 conv, stride 2) followed by blocks of one width."""

    def __init__(self, in_width: int, width: int, downsample: bool, drop_paths: list[float], cfg: ConvNeXtConfig):
        super().__init__()
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential()
            self.downsample.add_module("norm", LayerNorm2d(in_width, eps=cfg.norm_eps))
            self.downsample.add_module("conv", nn.Conv2d(in_width, width, 2, stride=2))
        self.blocks = nn.Sequential(*[Block(width, p, cfg.layer_scale_init, cfg.norm_eps) for p in drop_paths])

    def forward(self, x: Tensor, grad_checkpointing: bool = False) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            # Non-reentrant checkpointing restores the RNG state, so drop path drops the same samples again.
            x = checkpoint(block, x, use_reentrant=False) if grad_checkpointing else block(x)
        return x


class ConvNeXt(nn.Module):
    """ConvNeXt trunk, global average pool, LayerNorm, and a bias-free linear projection to embed_dim.

    Args:
        cfg: the tower's architecture.
        embed_dim: output size E.
    """

    def __init__(self, cfg: ConvNeXtConfig, embed_dim: int):
        super().__init__()
        if len(cfg.depths) != len(cfg.dims):
            raise ValueError(f"ConvNeXt depths {cfg.depths} and dims {cfg.dims} must have the same length")
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.image_size = (cfg.image_size, cfg.image_size)  # (H, W), as OpenCLIP's (timm) ConvNeXt says it
        self.grad_checkpointing = False
        self.stem = nn.Sequential()  # 4x4 patches
        self.stem.add_module("conv", nn.Conv2d(3, cfg.dims[0], 4, stride=4))
        self.stem.add_module("norm", LayerNorm2d(cfg.dims[0], eps=cfg.norm_eps))
        # Stochastic depth grows linearly from 0 at the first block to cfg.drop_path at the last.
        rates = torch.linspace(0, cfg.drop_path, sum(cfg.depths), device="cpu").split(list(cfg.depths))
        widths = (cfg.dims[0], *cfg.dims)
        self.stages = nn.ModuleList(
            Stage(widths[i], widths[i + 1], i > 0, r.tolist(), cfg) for i, r in enumerate(rates)
        )
        self.norm = nn.LayerNorm(cfg.dims[-1], eps=cfg.norm_eps)
        self.proj = _head(cfg.proj_type, cfg.dims[-1], embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """timm's: truncated N(0, 0.02) convs and MLP, zero biases, unit norms; the projection keeps
        PyTorch's default, as in OpenCLIP."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, Block):
                nn.init.constant_(m.layer_scale, self.cfg.layer_scale_init)
        for layer in self.proj.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (training only)."""
        self.grad_checkpointing = enable

    def forward(self, images: Tensor) -> Tensor:
        """Map (B, 3, H, W) images to (B, E) unnormalised features."""
        x = self.stem(images.to(self.stem.conv.weight.dtype))  # (B, D, H/4, W/4); float32 pixels in a bf16 tower
        for stage in self.stages:
            x = stage(x, grad_checkpointing=self.grad_checkpointing and self.training)
        x = self.norm(x.mean(dim=(2, 3)))  # (B, D)
        return self.proj(x)  # (B, E)


class MLPHead(nn.Module):
    """OpenCLIP's `timm_proj="mlp"` head: fc1 (to 2 * embed_dim, with bias), GELU, fc2 (to embed_dim, no bias)."""

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * embed_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * embed_dim, embed_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _head(proj_type: str, width: int, embed_dim: int) -> nn.Module:
    if proj_type == "linear":
        return nn.Linear(width, embed_dim, bias=False)
    if proj_type == "mlp":
        return MLPHead(width, embed_dim)
    raise ValueError(f"unknown ConvNeXt proj_type {proj_type!r}; expected 'linear' or 'mlp'")


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al. 2016): drop the whole branch per sample, rescale the kept ones."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


def _key_map() -> KeyMap:
    """Ours <-> OpenCLIP's TimmModel (timm's ConvNeXt under `trunk.`, the projection under `head.`).

    timm's ConvNeXt always has four stages; `{i}` is the block within one.
    """
    rules = [Rule(f"stem.{ours}.{k}", f"trunk.stem.{theirs}.{k}") for ours, theirs in (("conv", 0), ("norm", 1))
             for k in ("weight", "bias")]
    for s in range(4):
        ours, theirs = f"stages.{s}", f"trunk.stages.{s}"
        rules += [Rule(f"{ours}.downsample.{o}.{k}", f"{theirs}.downsample.{t}.{k}")
                  for o, t in (("norm", 0), ("conv", 1)) for k in ("weight", "bias")]
        rules.append(Rule(f"{ours}.blocks.{{i}}.layer_scale", f"{theirs}.blocks.{{i}}.gamma"))
        rules += [Rule(f"{ours}.blocks.{{i}}.{o}.{k}", f"{theirs}.blocks.{{i}}.{t}.{k}")
                  for o, t in (("conv_dw", "conv_dw"), ("norm", "norm"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2"))
                  for k in ("weight", "bias")]
    rules += [Rule(f"norm.{k}", f"trunk.head.norm.{k}") for k in ("weight", "bias")]
    rules.append(Rule("proj.weight", "head.proj.weight"))  # timm_proj="linear"
    rules += [Rule(f"proj.{k}", f"head.mlp.{k}") for k in ("fc1.weight", "fc1.bias", "fc2.weight")]  # "mlp"
    return KeyMap(rules)


_KEY_MAP = _key_map()


def convert_from_open_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an OpenCLIP ConvNeXt `visual.` state dict (prefix removed) to this tower's keys.

    Raises:
        ValueError: keys that no rule converts, named.
    """
    return _KEY_MAP.to_ours(sd)


def convert_to_open_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename this tower's state dict to OpenCLIP ConvNeXt `visual.` keys (prefix removed)."""
    return _KEY_MAP.to_theirs(sd)
