"""The Vision Transformer image tower: OpenAI CLIP's (class token), SigLIP's (attention-pool head), CLIPA's
(average of the patch tokens) and CoCa's (attentional pooler: many learned queries)."""

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


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler (OpenCLIP's `AttentionalPooler`): learned queries of size E, normalised, attend over
    the normalised tokens of size D; one multi-head cross-attention, no MLP."""

    def __init__(self, embed_dim: int, width: int, heads: int, queries: int, norm_eps: float):
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by pool_heads {heads}")
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(queries, embed_dim))
        self.ln_q = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.ln_k = nn.LayerNorm(width, eps=norm_eps)
        self.q = nn.Linear(embed_dim, embed_dim)
        self.k = nn.Linear(width, embed_dim)
        self.v = nn.Linear(width, embed_dim)
        self.out = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor, queries: int | None = None) -> Tensor:
        """Tokens (B, N, D) to the outputs of the first `queries` queries (all by default), (B, Q, E).

        Each query attends on its own (the queries never see each other), so the first one alone, all that the
        contrastive feature needs, costs 1/Q of the whole pool.
        """
        B, N, _ = x.shape
        E = self.query.shape[1]
        Dh = E // self.heads
        q = self.q(self.ln_q(self.query[:queries]))  # (Q, E)
        q = q.view(1, -1, self.heads, Dh).transpose(1, 2).expand(B, -1, -1, -1)  # (B, H, Q, Dh)
        x = self.ln_k(x)
        k = self.k(x).view(B, N, self.heads, Dh).transpose(1, 2)  # (B, H, N, Dh)
        v = self.v(x).view(B, N, self.heads, Dh).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, E)  # (B, Q, E)
        return self.out(x)


@torch.compiler.disable
def _random_subsets(batch: int, n: int, keep: int, device: torch.device) -> Tensor:
    """`keep` distinct indices of `n` per row, at random, (batch, keep). Drawn eagerly even in a compiled model, so
    that a run replaying the random state (GradCache's recompute) draws the same subsets."""
    return torch.randn(batch, n, device=device).topk(keep, dim=-1).indices


class VisionTransformer(nn.Module):
    """Patchify, add positions, run pre-norm blocks, pool (class token, attention head or patch average), project."""

    def __init__(self, cfg: VisionTransformerConfig, embed_dim: int):
        super().__init__()
        if cfg.image_size < cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is smaller than patch_size {cfg.patch_size}")
        if cfg.pool not in ("cls", "map", "avg", "attentional"):
            raise ValueError(f"unknown ViT pool {cfg.pool!r}; expected 'cls', 'map', 'avg' or 'attentional'")
        if cfg.pool == "cls" and not cfg.class_token:
            raise ValueError("pool='cls' needs class_token=True")
        if not cfg.projection and (embed_dim != cfg.width or cfg.pool == "attentional"):
            raise ValueError(f"projection=False needs embed_dim == width and a pool other than 'attentional', got "
                             f"{embed_dim}, {cfg.width} and {cfg.pool!r}")  # fmt: skip
        self.config = cfg
        self.image_size = (cfg.image_size, cfg.image_size)  # (H, W), as OpenCLIP's towers say it
        D = cfg.width
        # The patch grid is floored: pixels past the last whole patch are not seen (the strided convolution
        # drops them), as OpenCLIP and timm do (SO400M/14 at 384px: a 27x27 grid).
        tokens = (cfg.image_size // cfg.patch_size) ** 2 + int(cfg.class_token)
        self.patch_embed = nn.Conv2d(3, D, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.class_token = nn.Parameter(torch.zeros(D)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(tokens, D))
        self.ln_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(D, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps)
        self.attn_pool = (
            AttentionPoolHead(D, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps) if cfg.pool == "map" else None
        )
        self.attentional_pool = None
        if cfg.pool == "attentional":  # CoCa: the pool maps to embed_dim, and ln_post and proj work there
            self.attentional_pool = AttentionalPooler(embed_dim, D, cfg.pool_heads, cfg.pool_queries, cfg.norm_eps)
            D = embed_dim
        self.ln_post = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.proj = nn.Linear(D, embed_dim, bias=False) if cfg.projection else nn.Identity()
        self.patch_dropout = 0.0  # a training-time setting, not architecture: see set_patch_dropout
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
        if self.attentional_pool is not None:
            nn.init.normal_(self.attentional_pool.query)  # OpenCLIP's torch.randn

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def set_patch_dropout(self, fraction: float) -> None:
        """Drop this fraction of the patch tokens, a random set per image, in each training-mode forward pass (FLIP,
        Li et al. 2023; OpenCLIP's `PatchDropout`); the class token is always kept; eval mode sees every token.

        Raises:
            ValueError: a fraction outside [0, 1).
        """
        if not 0 <= fraction < 1:
            raise ValueError(f"patch dropout {fraction}: expected a fraction with 0 <= fraction < 1")
        self.patch_dropout = float(fraction)

    def _drop_patches(self, x: Tensor) -> Tensor:
        """Keep the class token and max(1, int(N * (1 - p))) of the N patch tokens, chosen per image, as OpenCLIP's
        `PatchDropout` counts them (a tower without a class token draws from all its tokens, as timm's does)."""
        if not self.training or self.patch_dropout == 0:
            return x
        prefix = int(self.config.class_token)
        cls, patches = x[:, :prefix], x[:, prefix:]  # (B, 1 or 0, D), (B, N, D)
        B, N, D = patches.shape
        keep = max(1, int(N * (1 - self.patch_dropout)))
        index = _random_subsets(B, N, keep, x.device)  # (B, K)
        patches = patches.gather(1, index[..., None].expand(-1, -1, D))  # (B, K, D)
        return torch.cat([cls, patches], dim=1)  # (B, prefix + K, D)

    def lock_groups(self) -> list[list]:
        """OpenCLIP's groups for `lock_image_tower(unlocked_groups=N)`, input to output."""
        blocks = list(self.transformer.blocks)
        top = [blocks[-1], self.attn_pool, self.attentional_pool, self.ln_post]
        return [[self.patch_embed, self.class_token, self.pos_embed, self.ln_pre], *([b] for b in blocks[:-1]), top,
                [self.proj]]  # fmt: skip

    def embed(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) to the token sequence the first block sees, (B, N, D); in training mode with patch
        dropout set, fewer patch tokens."""
        patch = self.patch_embed  # float32 pixels in a bf16 tower are cast (`fast.PackedPatchEmbed` casts them itself)
        x = patch(images if getattr(patch, "takes_any_dtype", False) else images.to(patch.weight.dtype))  # (B, D, h, w)
        S, grid = self.config.image_size, self.config.image_size // self.config.patch_size
        if x.shape[-2:] != (grid, grid):
            raise ValueError(f"images of {images.shape[-2]}x{images.shape[-1]} pixels; this model takes {S}x{S} "
                             "(fixed-size square input: other resolutions and aspect ratios, such as Siglip2's "
                             "NaFlex, are not supported)")  # fmt: skip
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        if self.class_token is not None:
            cls = self.class_token.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        # patches are dropped after their positions are added, so the kept ones keep their place in the grid
        return self.ln_pre(self._drop_patches(x + self.pos_embed.to(x.dtype)))

    def forward_tokens(self, images: Tensor) -> Tensor:
        """Every token after the last block and `ln_post`, (B, N, D), before pooling; with the "attentional" pool,
        every query's output after `ln_post`, (B, Q, E)."""
        x = self.transformer(self.embed(images))
        return self.ln_post(x if self.attentional_pool is None else self.attentional_pool(x))

    def forward_caption_tokens(self, images: Tensor) -> Tensor:
        """The tokens CoCa's caption decoder attends to: all but the first of `forward_tokens` (the class token's
        place, or the query whose output is the feature), (B, N - 1, D) or (B, Q - 1, E)."""
        return self.forward_tokens(images)[:, 1:]

    def forward(self, images: Tensor) -> Tensor:
        x = self.embed(images)
        if self.attentional_pool is not None:
            pooled = self.ln_post(self.attentional_pool(self.transformer(x), queries=1)[:, 0])  # (B, E)
        elif self.attn_pool is not None:
            pooled = self.attn_pool(self.ln_post(self.transformer(x)))
        elif self.config.pool == "avg":
            pooled = self.ln_post(self.transformer(x)[:, int(self.config.class_token) :].mean(dim=1))  # (B, D)
        else:
            # Only the class token's output is used: the last block computes that row alone, and
            # LayerNorm is per token, so normalising the class token alone gives the same features.
            index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            pooled = self.ln_post(self.transformer.forward_one(x, index))
        return self.proj(pooled)  # (B, E)


_WB = ("weight", "bias")
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
        # CoCa's attentional pooler; its q, k and v are split out of nn.MultiheadAttention's packing first
        Rule("attentional_pool.query", "attn_pool.query"),
        *[Rule(f"attentional_pool.{n}.{p}", f"attn_pool.{n}.{p}") for n in ("ln_q", "ln_k") for p in _WB],
        *[Rule(f"attentional_pool.{n}.{p}", f"attn_pool.attn.{n}_proj_{p}") for n in "qkv" for p in _WB],
        Rule("attentional_pool.out.weight", "attn_pool.attn.out_proj.weight"),
        Rule("attentional_pool.out.bias", "attn_pool.attn.out_proj.bias"),
    ]
)
_POOL_ATTN = "attn_pool.attn."


def _unpack_pool_qkv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP's CoCa pooler is an nn.MultiheadAttention: its q, k and v biases are packed in one tensor, and so are
    their weights when the tokens are as wide as the queries (else they are three tensors). Split them."""
    if _POOL_ATTN + "in_proj_bias" not in sd:
        return sd
    sd = dict(sd)
    packed = {"bias": sd.pop(_POOL_ATTN + "in_proj_bias")}
    if _POOL_ATTN + "in_proj_weight" in sd:
        packed["weight"] = sd.pop(_POOL_ATTN + "in_proj_weight")
    for p, t in packed.items():
        sd.update({f"{_POOL_ATTN}{n}_proj_{p}": part for n, part in zip("qkv", t.chunk(3))})
    return sd


def _pack_pool_qkv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `_unpack_pool_qkv`: nn.MultiheadAttention's packing, the weights packed when all three have the
    same shape."""
    if _POOL_ATTN + "q_proj_bias" not in sd:
        return sd
    sd = dict(sd)
    parts = {p: [sd.pop(f"{_POOL_ATTN}{n}_proj_{p}") for n in "qkv"] for p in ("weight", "bias")}
    sd[_POOL_ATTN + "in_proj_bias"] = torch.cat(parts["bias"])
    if len({t.shape for t in parts["weight"]}) == 1:
        sd[_POOL_ATTN + "in_proj_weight"] = torch.cat(parts["weight"])
    else:
        sd.update({f"{_POOL_ATTN}{n}_proj_weight": t for n, t in zip("qkv", parts["weight"])})
    return sd


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
    if any(k.startswith("trunk.") for k in sd):
        return TIMM_KEYMAP.to_ours(sd)
    return OPEN_CLIP_KEYMAP.to_ours(_unpack_pool_qkv(sd))


def convert_to_open_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our VisionTransformer keys to OpenCLIP's `visual.` subtree (the inverse of convert_from_open_clip)."""
    if any(k.startswith("attn_pool.") for k in sd):
        return TIMM_KEYMAP.to_theirs(sd)
    return _pack_pool_qkv(OPEN_CLIP_KEYMAP.to_theirs(sd))
