"""The Hugging Face encoder families' embeddings and blocks: BERT (RoBERTa, XLM-R), T5 (mT5), M2M100 (NLLB)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import BertTextConfig, M2M100TextConfig, T5TextConfig
from .hf_text import FeedForward, HFTextTower, PostNormBlock, PreNormBlock, SelfAttention


def padded_positions(mask: Tensor, pad_id: int) -> Tensor:
    """fairseq's position ids (RoBERTa, M2M100): real tokens count from pad_id + 1, padding stays at pad_id. (B, L)"""
    mask = mask.long()
    return mask.cumsum(dim=1) * mask + pad_id


def _init_linear(layer: nn.Linear, std: float) -> None:
    nn.init.normal_(layer.weight, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _init_normal(tower: nn.Module, std: float) -> None:
    """transformers' init of BERT and M2M100: N(0, std) weights and embeddings, zero biases, unit LayerNorms."""
    for module in tower.modules():
        if isinstance(module, nn.Linear):
            _init_linear(module, std)
        elif isinstance(module, nn.Embedding):
            _init_embedding(module, std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _init_embedding(embedding: nn.Embedding, std: float) -> None:
    nn.init.normal_(embedding.weight, std=std)
    if embedding.padding_idx is not None:
        with torch.no_grad():
            embedding.weight[embedding.padding_idx].zero_()


class BertTextTower(HFTextTower):
    """RoBERTa / XLM-RoBERTa: word + token-type + position embeddings and a LayerNorm, then post-LN blocks; "cls"
    pooling adds BERT's pooler. No final norm (the last block ends with one)."""

    def __init__(self, cfg: BertTextConfig, embed_dim: int):
        super().__init__(cfg, embed_dim)
        D = cfg.width
        if D % cfg.heads:
            raise ValueError(f"width {D} is not divisible by heads {cfg.heads}")
        self.token_embed = nn.Embedding(cfg.vocab_size, D, padding_idx=cfg.pad_id)
        self.pos_embed = nn.Embedding(cfg.max_positions, D, padding_idx=cfg.pad_id)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, D)
        self.ln_embed = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(
            PostNormBlock(
                SelfAttention(D, cfg.heads, D // cfg.heads),
                FeedForward(D, cfg.mlp_width, cfg.act),
                nn.LayerNorm(D, eps=cfg.norm_eps),
                nn.LayerNorm(D, eps=cfg.norm_eps),
            )
            for _ in range(cfg.layers)
        )
        self.ln_final = nn.Identity()
        self.pooler = nn.Linear(D, D) if cfg.pool == "cls" else None
        self.init_weights()

    def init_weights(self) -> None:
        """transformers' BERT init: N(0, 0.02) weights, zero biases, unit LayerNorms."""
        _init_normal(self, 0.02)
        self.init_head()

    def embed(self, tokens: Tensor, mask: Tensor) -> Tensor:
        L = tokens.shape[1]
        positions = self.config.max_positions - self.config.pad_id - 1  # the table's rows after the padding offset
        if L > positions:
            raise ValueError(f"token sequences of length {L} exceed the {positions} positions of this text encoder")
        x = self.token_embed(tokens) + self.type_embed.weight[0]  # every token has type 0, (B, L, D)
        x = x + self.pos_embed(padded_positions(mask, self.config.pad_id))
        return self.ln_embed(x)


def relative_buckets(length: int, buckets: int, max_distance: int, device: torch.device) -> Tensor:
    """T5's bidirectional relative-position buckets for every (query, key) pair, (L, L).

    Half the buckets are for keys after the query. Offsets below a quarter of the buckets have one bucket each; larger
    ones share log-spaced buckets up to `max_distance`, past which all share the last (Raffel et al. 2020, §2.1).
    """
    position = torch.arange(length, device=device)
    offset = position[None, :] - position[:, None]  # key - query, (L, L)
    half = buckets // 2
    exact = half // 2
    distance = offset.abs()
    log_spaced = exact + (
        torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)
    ).to(torch.long)
    log_spaced = log_spaced.clamp(max=half - 1)
    return (offset > 0).long() * half + torch.where(distance < exact, distance, log_spaced)


class T5TextTower(HFTextTower):
    """mT5's encoder: token embeddings (no positions), RMSNorm pre-norm blocks whose attention adds a relative-position
    bias, a final RMSNorm. No biases anywhere."""

    def __init__(self, cfg: T5TextConfig, embed_dim: int):
        super().__init__(cfg, embed_dim)
        D = cfg.width
        self.token_embed = nn.Embedding(cfg.vocab_size, D)
        self.rel_bias = nn.Embedding(cfg.rel_buckets, cfg.heads)  # (buckets, H): block 0's, shared by every block
        self.blocks = nn.ModuleList(
            PreNormBlock(
                nn.RMSNorm(D, eps=cfg.norm_eps),
                SelfAttention(D, cfg.heads, cfg.head_width, bias=False, scale=1.0),
                nn.RMSNorm(D, eps=cfg.norm_eps),
                FeedForward(D, cfg.mlp_width, "gelu_tanh", bias=False, gated=True),
            )
            for _ in range(cfg.layers)
        )
        self.ln_final = nn.RMSNorm(D, eps=cfg.norm_eps)
        self.init_weights()

    def init_weights(self) -> None:
        """transformers' T5 init (initializer_factor 1): each matrix's std is its fan-in's -1/2 power."""
        cfg = self.config
        D, inner = cfg.width, cfg.heads * cfg.head_width
        nn.init.normal_(self.token_embed.weight, std=1.0)
        nn.init.normal_(self.rel_bias.weight, std=D**-0.5)
        for block in self.blocks:
            nn.init.normal_(block.attn.q.weight, std=(D * cfg.head_width) ** -0.5)
            for layer in (block.attn.k, block.attn.v, block.mlp.gate, block.mlp.fc1):
                nn.init.normal_(layer.weight, std=D**-0.5)
            nn.init.normal_(block.attn.out.weight, std=inner**-0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=cfg.mlp_width**-0.5)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        self.init_head()

    def embed(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.token_embed(tokens)  # (B, L, D)

    def attention_mask(self, mask: Tensor) -> Tensor:
        """The additive bias every block's attention takes: the relative-position bias, and the dtype's minimum at
        padding keys (B, H, L, L)."""
        cfg = self.config
        buckets = relative_buckets(mask.shape[1], cfg.rel_buckets, cfg.rel_max_distance, mask.device)
        bias = self.rel_bias(buckets).permute(2, 0, 1)[None]  # (1, H, L, L)
        return bias.masked_fill(~mask[:, None, None, :], torch.finfo(bias.dtype).min)  # (B, H, L, L)


def sinusoids(rows: int, width: int, pad_id: int) -> Tensor:
    """fairseq's sinusoidal position table (M2M100), (rows, width): row p is [sin(p f), cos(p f)] with
    f_i = 10000^(-i / (width/2 - 1)); the padding row is zero."""
    half = width // 2
    freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -(math.log(10000) / (half - 1)))
    angle = torch.arange(rows, dtype=torch.int64).float()[:, None] * freq[None, :]  # (rows, half)
    table = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    if width % 2:
        table = torch.cat([table, torch.zeros(rows, 1)], dim=1)
    table[pad_id] = 0
    return table


class M2M100TextTower(HFTextTower):
    """NLLB's encoder: scaled token embeddings plus sinusoidal positions, pre-LN blocks, a final LayerNorm."""

    def __init__(self, cfg: M2M100TextConfig, embed_dim: int):
        super().__init__(cfg, embed_dim)
        D = cfg.width
        if D % cfg.heads:
            raise ValueError(f"width {D} is not divisible by heads {cfg.heads}")
        self.embed_scale = math.sqrt(D) if cfg.scale_embedding else 1.0
        self.token_embed = nn.Embedding(cfg.vocab_size, D, padding_idx=cfg.pad_id)
        self.blocks = nn.ModuleList(
            PreNormBlock(
                nn.LayerNorm(D, eps=cfg.norm_eps),
                SelfAttention(D, cfg.heads, D // cfg.heads),
                nn.LayerNorm(D, eps=cfg.norm_eps),
                FeedForward(D, cfg.mlp_width, cfg.act),
            )
            for _ in range(cfg.layers)
        )
        self.ln_final = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.init_weights()

    def init_weights(self) -> None:
        """transformers' M2M100 init: N(0, 0.02) weights, zero biases, unit LayerNorms."""
        _init_normal(self, 0.02)
        self.init_head()

    def embed(self, tokens: Tensor, mask: Tensor) -> Tensor:
        # The table is computed, not stored (no buffer to load, and a model built on the meta device has one too).
        pad_id = self.config.pad_id
        table = sinusoids(tokens.shape[1] + pad_id + 1, self.config.width, pad_id).to(tokens.device)
        x = self.token_embed(tokens) * self.embed_scale  # (B, L, D)
        return x + table[padded_positions(mask, pad_id)].to(x.dtype)


FAMILIES: dict[str, type[HFTextTower]] = {"bert": BertTextTower, "t5": T5TextTower, "m2m100": M2M100TextTower}
