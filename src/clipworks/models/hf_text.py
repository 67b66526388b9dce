"""Text towers of the Hugging Face encoder families OpenCLIP runs through transformers, run natively.

OpenCLIP builds RoBERTa, XLM-RoBERTa, mT5 and NLLB (M2M100) text towers as `HFTextEncoder`s around transformers'
models. These are the same computations in clipworks' own modules (transformers is not imported): the shared part,
pooling, projection, padding trim and block loop, lives here; the families' embeddings and blocks in
`hf_families.py`. Checkpoint layouts are converted at the boundary (checkpoints/open_clip_hf.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import HF_TEXT_POOLS, HF_TEXT_PROJECTIONS, HFTextConfig
from .layers import build_activation
from .text import TextHidden


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections (the layout of transformers' encoders).

    Args:
        scale: the logits' scale; None for 1/sqrt(head_width), 1.0 for T5 (which folds the scale into its weights).
    """

    def __init__(self, width: int, heads: int, head_width: int, bias: bool = True, scale: float | None = None):
        super().__init__()
        inner = heads * head_width
        self.heads, self.head_width, self.scale = heads, head_width, scale
        self.q = nn.Linear(width, inner, bias=bias)
        self.k = nn.Linear(width, inner, bias=bias)
        self.v = nn.Linear(width, inner, bias=bias)
        self.out = nn.Linear(inner, width, bias=bias)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        """x (B, L, D); `attn_mask` a boolean (B, 1, 1, L) key mask or an additive float (B, H, L, L) bias."""
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.heads, self.head_width).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)  # (B, H, L, Dh)
        return self.out(x.transpose(1, 2).reshape(B, L, self.heads * self.head_width))


class FeedForward(nn.Module):
    """fc2(act(fc1(x))), or with `gated` (T5 v1.1's gated GELU) fc2(act(gate(x)) * fc1(x))."""

    def __init__(self, width: int, hidden: int, act: str, bias: bool = True, gated: bool = False):
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=bias) if gated else None
        self.fc1 = nn.Linear(width, hidden, bias=bias)
        self.act = build_activation(act)
        self.fc2 = nn.Linear(hidden, width, bias=bias)
        self.linears = ("gate", "fc1", "fc2") if gated else ("fc1", "fc2")

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc1(x)) if self.gate is None else self.act(self.gate(x)) * self.fc1(x)
        return self.fc2(h)


def _int8_linears(attn: SelfAttention, mlp: FeedForward) -> tuple[str, ...]:
    """The block's linear layers `quant.quantize_int8` replaces: attention projections and feed-forward layers."""
    return ("attn.q", "attn.k", "attn.v", "attn.out", *(f"mlp.{name}" for name in mlp.linears))


class PostNormBlock(nn.Module):
    """BERT's block: x = ln_1(x + attn(x)), then x = ln_2(x + mlp(x))."""

    def __init__(self, attn: SelfAttention, mlp: FeedForward, ln_1: nn.Module, ln_2: nn.Module):
        super().__init__()
        self.attn, self.ln_1, self.mlp, self.ln_2 = attn, ln_1, mlp, ln_2
        self.int8_linears = _int8_linears(attn, mlp)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        x = self.ln_1(self.attn(x, attn_mask) + x)
        return self.ln_2(self.mlp(x) + x)


class PreNormBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)): M2M100's block (LayerNorm) and T5's (RMSNorm)."""

    def __init__(self, ln_1: nn.Module, attn: SelfAttention, ln_2: nn.Module, mlp: FeedForward):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp
        self.int8_linears = _int8_linears(attn, mlp)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class ProjectionMLP(nn.Module):
    """OpenCLIP's `hf_proj_type='mlp'`: Linear(D, (D+E)//2) - GELU - Linear(E), without biases."""

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        hidden = (width + embed_dim) // 2
        self.fc1 = nn.Linear(width, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, embed_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def build_projection(proj_type: str, width: int, embed_dim: int) -> nn.Module:
    """The map from pooled features (B, width) to (B, embed_dim) that OpenCLIP's `hf_proj_type` names."""
    if proj_type == "mlp":
        return ProjectionMLP(width, embed_dim)
    if proj_type == "linear":
        return nn.Linear(width, embed_dim, bias=False)
    if proj_type == "none":
        if width != embed_dim:
            raise ValueError(f"text proj_type='none' needs embed_dim == width, got {embed_dim} and {width}")
        return nn.Identity()
    raise ValueError(f"unknown text proj_type {proj_type!r}; expected one of {HF_TEXT_PROJECTIONS}")


class HFTextTower(nn.Module):
    """What every Hugging Face family's tower shares: token ids (B, L) to features (B, E).

    The attention mask is `tokens != pad_id`, as OpenCLIP computes it. A family (hf_families.py) provides `embed`,
    `blocks`, `ln_final` (an Identity where the family has no final norm), and `attention_mask` when its attention
    takes more than the padding mask (T5's position bias).

    Padding trim: `forward` cuts the batch after the last column holding a real token in any row. That changes no
    output of a row with at least one real token (every tokenizer adds a special token, so every real row has one):

    - attention: the cut columns are padding in every row, so they are masked keys for every query; their weights are
      exactly zero, and the queries at cut positions feed nothing that is kept (each later layer reads positions only
      through attention, i.e. through keys, and the cut ones are masked);
    - positions: BERT and M2M100 number real tokens by a running count of the mask (`cumsum`), so a kept token's
      position depends only on the columns before it; T5's bias depends only on the offset key - query, not on L;
    - pooling: "mean" weighs by the mask (the cut columns have weight 0), "cls"/"first" read position 0, always kept;
    - the norms, feed-forward layers, projection and BERT's pooler act on each token alone.

    `forward_hidden` does not trim: diffusion models condition on all L positions.
    """

    blocks: nn.ModuleList
    ln_final: nn.Module

    def __init__(self, cfg: HFTextConfig, embed_dim: int):
        super().__init__()
        if cfg.pool not in HF_TEXT_POOLS:
            raise ValueError(f"unknown text pool {cfg.pool!r} for a {cfg.kind} tower; expected one of {HF_TEXT_POOLS}")
        self.config = cfg
        self.context_length = cfg.context_length
        self.grad_checkpointing = False
        self.pooler: nn.Linear | None = None
        self.proj = build_projection(cfg.proj_type, cfg.width, embed_dim)

    def init_weights(self) -> None:
        """The family's own initialisation (transformers'), then `init_head`."""
        raise NotImplementedError

    def embed(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Token ids (B, L) and their real-token mask to the first block's input (B, L, D)."""
        raise NotImplementedError

    def attention_mask(self, mask: Tensor) -> Tensor | None:
        """The attention's mask from the real-token mask (B, L): padding keys are masked; None when there are none."""
        return None if bool(mask.all()) else mask[:, None, None, :]  # (B, 1, 1, L)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def trim(self, tokens: Tensor) -> Tensor:
        """Drop the columns after the last real token of the batch (see the class docstring for why it is exact)."""
        real = (tokens != self.config.pad_id).any(dim=0).nonzero()
        end = int(real.max()) + 1 if len(real) else 1
        return tokens[:, :end]

    def pool(self, x: Tensor, mask: Tensor) -> Tensor:
        """Last hidden states (B, L, D) to one vector per sequence (B, D)."""
        if self.config.pool == "mean":
            weights = mask.to(x.dtype)[..., None]  # (B, L, 1)
            return (x * weights).sum(dim=1) / weights.sum(dim=1)
        first = x[:, 0]
        return first if self.pooler is None else torch.tanh(self.pooler(first))

    def _run(self, block: nn.Module, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, attn_mask, use_reentrant=False)
        return block(x, attn_mask)

    def forward(self, tokens: Tensor) -> Tensor:
        """Token ids (B, L) to unnormalised text features (B, E)."""
        tokens = self.trim(tokens)
        mask = tokens != self.config.pad_id  # (B, L)
        x = self.embed(tokens, mask)
        attn_mask = self.attention_mask(mask)
        for block in self.blocks:
            x = self._run(block, x, attn_mask)
        return self.proj(self.pool(self.ln_final(x), mask))

    def forward_hidden(self, tokens: Tensor) -> TextHidden:
        """The embeddings and every block's output (before the final norm), the final-norm states and the
        projected features, at full length."""
        mask = tokens != self.config.pad_id
        hidden = [self.embed(tokens, mask)]
        attn_mask = self.attention_mask(mask)
        for block in self.blocks:
            hidden.append(self._run(block, hidden[-1], attn_mask))
        last = self.ln_final(hidden[-1])
        return TextHidden(tuple(hidden), last, self.proj(self.pool(last, mask)))

    def init_head(self) -> None:
        """Initialise the pooler and projection (the encoder's families initialise the rest)."""
        if self.pooler is not None:
            nn.init.normal_(self.pooler.weight, std=0.02)
            nn.init.zeros_(self.pooler.bias)
        for layer in self.proj.modules():
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=layer.in_features**-0.5)


def build_hf_text_tower(cfg: HFTextConfig, embed_dim: int) -> HFTextTower:
    """The tower of a Hugging Face encoder family's config (BertTextConfig, T5TextConfig, M2M100TextConfig)."""
    from .hf_families import FAMILIES

    if cfg.kind not in FAMILIES:
        raise ValueError(f"unknown text tower kind {cfg.kind!r}; expected 'transformer' or one of {sorted(FAMILIES)}")
    return FAMILIES[cfg.kind](cfg, embed_dim)
