"""The text tower: token and position embeddings, a (causal) transformer, pooling at the end token (or, CoCa's, at a
class embedding appended after the tokens)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..config import TextConfig
from .keymap import KeyMap, Rule, block_rules, transpose
from .layers import OPEN_CLIP_BLOCK_KEYS, Transformer


class TextHidden(NamedTuple):
    """Everything the text tower computes for one batch.

    Attributes:
        hidden_states: the embeddings, then each block's output: layers + 1 tensors of (B, L, D), before the
            final LayerNorm (transformers' `hidden_states`; diffusion models' "CLIP skip" picks from these).
        last_hidden: `ln_final` of the last hidden state, (B, L, D) (transformers' `last_hidden_state`).
        pooled: the projected feature at the pooling position, (B, E) (what `encode_text` returns).
    """

    hidden_states: tuple[Tensor, ...]
    last_hidden: Tensor
    pooled: Tensor


class TextTransformer(nn.Module):
    """CLIP's text encoder; with a causal mask it pools at the end token, so padding can be trimmed away."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        if cfg.pool not in ("argmax", "eos", "last", "cls"):
            raise ValueError(f"unknown text pool {cfg.pool!r}; expected 'argmax', 'eos', 'last' or 'cls'")
        if cfg.pool == "cls" and not cfg.causal:
            raise ValueError("text pool='cls' (CoCa's appended class embedding) needs causal=True")
        if not cfg.projection and embed_dim != cfg.width:
            raise ValueError(f"text projection=False needs embed_dim == width, got {embed_dim} and {cfg.width}")
        self.config = cfg
        self.context_length = cfg.context_length
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.class_embed = nn.Parameter(torch.zeros(cfg.width)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length + int(cfg.pool == "cls"), cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=cfg.proj_bias) if cfg.projection else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed, std=0.01)
        self.transformer.init_weights()
        if isinstance(self.proj, nn.Linear):
            nn.init.normal_(self.proj.weight, std=self.config.width**-0.5)
            if self.proj.bias is not None:
                nn.init.zeros_(self.proj.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def lock_groups(self) -> list[list]:
        """OpenCLIP's groups for `lock_text_tower(unlocked_layers=N)`, input to output."""
        blocks = list(self.transformer.blocks)
        return [[self.token_embed, self.pos_embed, self.class_embed], *([b] for b in blocks[:-1]),
                [blocks[-1], self.ln_final], [self.proj]]  # fmt: skip

    def pool_index(self, tokens: Tensor) -> Tensor:
        """The position whose feature represents each sequence, (B,)."""
        if self.config.pool == "argmax":
            # CLIP's end token has the highest id, so argmax finds it (the reference's rule, kept for parity).
            return tokens.argmax(dim=-1)
        if self.config.pool == "eos":
            return (tokens == self.config.eos_id).int().argmax(dim=-1)
        last = tokens.shape[1] - int(self.config.pool != "cls")  # the class embedding comes after the L tokens
        return torch.full((tokens.shape[0],), last, dtype=torch.long, device=tokens.device)

    def trim(self, tokens: Tensor) -> Tensor:
        """Drop the padding columns after the longest sequence's pooling position.

        With a causal mask no position attends to a later one, so the columns after the last pooled position
        cannot change any pooled feature: dropping them gives identical features for less work. A
        bidirectional tower (SigLIP) or last-position pooling sees every column, and CoCa's class embedding sits
        after all of them, so nothing is trimmed.
        """
        if not self.config.causal or self.config.pool in ("last", "cls") or tokens.shape[1] == 0:
            return tokens
        end = int(self.pool_index(tokens).max()) + 1
        return tokens[:, :end]

    def embed(self, tokens: Tensor) -> Tensor:
        """Token ids (B, L) to the sequence the first block sees: (B, L, D), or (B, L + 1, D) with the class
        embedding appended."""
        B, L = tokens.shape
        if L > self.context_length:
            raise ValueError(f"token sequences of length {L} exceed the context length {self.context_length}")
        x = self.token_embed(tokens)  # (B, L, D)
        if self.class_embed is not None:
            x = torch.cat([x, self.class_embed.to(x.dtype).expand(B, 1, -1)], dim=1)  # (B, L + 1, D)
        return x + self.pos_embed[: x.shape[1]]

    def key_mask(self, tokens: Tensor) -> Tensor | None:
        """For the "cls" pool, which positions each position attends to, (B, 1, L + 1, L + 1), True where it may:
        causal, and padding skipped as OpenCLIP's CoCa weights were trained. Its mask of real tokens is shifted one
        place right (OpenCLIP's `correct_cls_mask=False`, which every CoCa release has): position 0 is always seen,
        position j > 0 when token j - 1 is not padding; so the first padding position is seen, and the class
        position sees itself only when the last token is not padding. None for the other pools (causal or
        bidirectional attention over every position)."""
        if self.class_embed is None:
            return None
        B, L = tokens.shape
        real = tokens != self.config.pad_id
        seen = torch.cat([real.new_ones(B, 1), real], dim=1)  # (B, L + 1): shifted, as trained
        causal = torch.ones(L + 1, L + 1, dtype=torch.bool, device=tokens.device).tril()
        return (causal & seen[:, None, :])[:, None]  # (B, 1, L + 1, L + 1)

    def forward(self, tokens: Tensor) -> Tensor:
        """Token ids (B, L) to unnormalised text features (B, E)."""
        tokens = self.trim(tokens)
        mask = self.key_mask(tokens)  # (the mask is causal where there is one)
        # Only the pooled position's output is used: the last block computes that row alone, and LayerNorm
        # is per token, so normalising the pooled row alone gives the same features.
        x = self.transformer.forward_one(
            self.embed(tokens), self.pool_index(tokens), self.config.causal and mask is None, mask
        )  # (B, D)
        return self.proj(self.ln_final(x))

    def forward_hidden(self, tokens: Tensor) -> TextHidden:
        """Every layer's hidden states at full length (diffusion models condition on all L positions; CoCa's caption
        decoder reads the last block's). The class embedding's position, if any, is pooled but not returned."""
        mask = self.key_mask(tokens)
        hidden = self.transformer.forward_hidden(self.embed(tokens), self.config.causal and mask is None, mask)
        last = self.ln_final(hidden[-1])
        pooled = self.proj(last[torch.arange(last.shape[0], device=last.device), self.pool_index(tokens)])
        L = tokens.shape[1]
        return TextHidden(tuple(h[:, :L] for h in hidden), last[:, :L], pooled)


_EMBED_RULES = [
    Rule("token_embed.weight", "token_embedding.weight"),
    Rule("class_embed", "cls_emb"),  # CoCa
    Rule("pos_embed", "positional_embedding"),
    Rule("ln_final.weight", "ln_final.weight"),
    Rule("ln_final.bias", "ln_final.bias"),
    *block_rules("transformer.resblocks", "transformer.blocks", OPEN_CLIP_BLOCK_KEYS),
]
# OpenAI's CLIP class stores the projection as a (D, E) matrix; OpenCLIP's CustomTextCLIP as a Linear.
OPEN_CLIP_KEYMAP = KeyMap([*_EMBED_RULES, Rule("proj.weight", "text_projection", transpose, transpose)])
OPEN_CLIP_LINEAR_KEYMAP = KeyMap(
    [
        *_EMBED_RULES,
        Rule("proj.weight", "text_projection.weight"),
        Rule("proj.bias", "text_projection.bias"),
    ]
)


def convert_from_open_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP text keys (without the CLIP-level or `text.` prefix) to our TextTransformer keys."""
    keymap = OPEN_CLIP_LINEAR_KEYMAP if "text_projection.weight" in sd else OPEN_CLIP_KEYMAP
    return keymap.to_ours(sd)


def convert_to_open_clip(sd: dict[str, Tensor], linear_projection: bool = False) -> dict[str, Tensor]:
    """Our TextTransformer keys to OpenCLIP's; `linear_projection` for CustomTextCLIP models (SigLIP)."""
    return (OPEN_CLIP_LINEAR_KEYMAP if linear_projection else OPEN_CLIP_KEYMAP).to_theirs(sd)
