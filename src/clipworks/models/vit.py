"""The Vision Transformer image tower: OpenAI CLIP's (class token), SigLIP's (attention-pool head) and CLIPA's
(average of the patch tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VisionTransformerConfig
from .keymap import KeyMap, Rule, block_rules, transpose
from .layers import MLP, OPEN_CLIP_BLOCK_KEYS, TIMM_BLOCK_KEYS, Transformer


class AttentionPoolHead(nn.Module):
    """SigLIP's multi-head attention pooling (MAP): one learned query attends over all tokens, then an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, norm_eps: float):
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.zeros(1, 1, width))
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        Dh = D // self.heads
        q = self.q(self.latent.expand(B, -1, -1)).view(B, 1, self.heads, Dh).transpose(1, 2)  # (B, H, 1, Dh)
        k, v = self.kv(x).view(B, N, 2, self.heads, Dh).permute(2, 0, 3, 1, 4)  # 2 x (B, H, N, Dh)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D)
        x = self.proj(x)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]  # (B, D)


class VisionTransformer(nn.Module):
    """Patchify, add positions, run pre-norm blocks, pool (class token, attention head or patch average), project."""

    def __init__(self, cfg: VisionTransformerConfig, embed_dim: int):
        super().__init__()
        if cfg.image_size < cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is smaller than patch_size {cfg.patch_size}")
        if cfg.pool not in ("cls", "map", "avg"):
            raise ValueError(f"unknown ViT pool {cfg.pool!r}; expected 'cls', 'map' or 'avg'")
        if cfg.pool == "cls" and not cfg.class_token:
            raise ValueError("pool='cls' needs class_token=True")
        if not cfg.projection and embed_dim != cfg.width:
            raise ValueError(f"projection=False needs embed_dim == width, got {embed_dim} and {cfg.width}")
        self.config = cfg
        self.image_size = cfg.image_size
        D = cfg.width
        # The patch grid is floored: pixels past the last whole patch are not seen (the strided convolution
        # drops them), as OpenCLIP and timm do (SO400M/14 at 384px: a 27x27 grid).
        tokens = (cfg.image_size // cfg.patch_size) ** 2 + int(cfg.class_token)
        self.patch_embed = nn.Conv2d(3, D, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.class_token = nn.Parameter(torch.zeros(D)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(tokens, D))
        self.ln_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(D, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps)
        self.ln_post = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.attn_pool = (
            AttentionPoolHead(D, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps) if cfg.pool == "map" else None
        )
        self.proj = nn.Linear(D, embed_dim, bias=False) if cfg.projection else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        scale = self.config.width**-0.5
        if self.class_token is not None:
            nn.init.normal_(self.class_token, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)
        self.transformer.init_weights()
        if isinstance(self.proj, nn.Linear):
            nn.init.normal_(self.proj.weight, std=scale)
        if self.attn_pool is not None:
            nn.init.normal_(self.attn_pool.latent, std=scale)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def embed(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) to the token sequence the first block sees, (B, N, D)."""
        x = self.patch_embed(images)  # (B, D, h, w)
        S, grid = self.image_size, self.image_size // self.config.patch_size
        if x.shape[-2:] != (grid, grid):
            raise ValueError(f"images of {images.shape[-2]}x{images.shape[-1]} pixels; this model takes {S}x{S} "
                             "(fixed-size square input: other resolutions and aspect ratios, such as Siglip2's "
                             "NaFlex, are not supported)")  # fmt: skip
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        if self.class_token is not None:
            cls = self.class_token.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        return self.ln_pre(x + self.pos_embed.to(x.dtype))

    def forward_tokens(self, images: Tensor) -> Tensor:
        """Every token after the last block and `ln_post`, (B, N, D), before pooling."""
        return self.ln_post(self.transformer(self.embed(images)))

    def forward(self, images: Tensor) -> Tensor:
        x = self.embed(images)
        if self.attn_pool is not None:
            pooled = self.attn_pool(self.ln_post(self.transformer(x)))
        elif self.config.pool == "avg":
            pooled = self.ln_post(self.transformer(x)[:, int(self.config.class_token) :].mean(dim=1))  # (B, D)
        else:
            # Only the class token's output is used: the last block computes that row alone, and
            # LayerNorm is per token, so normalising the class token alone gives the same features.
            index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            pooled = self.ln_post(self.transformer.forward_one(x, index))
        return self.proj(pooled)  # (B, E)


OPEN_CLIP_KEYMAP = KeyMap(
    [
        Rule("patch_embed.weight", "conv1.weight"),
        Rule("class_token", "class_embedding"),
        Rule("pos_embed", "positional_embedding"),
        Rule("ln_pre.weight", "ln_pre.weight"),
        Rule("ln_pre.bias", "ln_pre.bias"),
        Rule("ln_post.weight", "ln_post.weight"),
        Rule("ln_post.bias", "ln_post.bias"),
        Rule("proj.weight", "proj", transpose, transpose),
        *block_rules("transformer.resblocks", "transformer.blocks", OPEN_CLIP_BLOCK_KEYS),
    ]
)


def _squeeze0(t: Tensor) -> Tensor:
    return t[0]


def _unsqueeze0(t: Tensor) -> Tensor:
    return t[None]


TIMM_KEYMAP = KeyMap(
    [
        Rule("patch_embed.weight", "trunk.patch_embed.proj.weight"),
        Rule("patch_embed.bias", "trunk.patch_embed.proj.bias"),
        Rule("pos_embed", "trunk.pos_embed", _squeeze0, _unsqueeze0),
        Rule("ln_post.weight", "trunk.norm.weight"),
        Rule("ln_post.bias", "trunk.norm.bias"),
        *block_rules("trunk.blocks", "transformer.blocks", TIMM_BLOCK_KEYS),
        *[
            Rule(f"attn_pool.{name}", f"trunk.attn_pool.{name}")
            for name in [
                "latent",
                *(f"{m}.{p}" for m in ("q", "kv", "proj", "norm", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")),
            ]
        ],
    ]
)


def convert_from_open_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP's `visual.` subtree (OpenAI layout, or timm's for SigLIP) to our VisionTransformer keys."""
    keymap = TIMM_KEYMAP if any(k.startswith("trunk.") for k in sd) else OPEN_CLIP_KEYMAP
    return keymap.to_ours(sd)


def convert_to_open_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our VisionTransformer keys to OpenCLIP's `visual.` subtree (the inverse of convert_from_open_clip)."""
    keymap = TIMM_KEYMAP if any(k.startswith("attn_pool.") for k in sd) else OPEN_CLIP_KEYMAP
    return keymap.to_theirs(sd)
