"""CoCa's caption decoder (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models"), as
OpenCLIP builds it: the text tower's token states, decoded causally while cross-attending to the image tower's caption
tokens, to logits over the vocabulary. Its contrastive towers are the ViT (`pool="attentional"`) and text
(`pool="cls"`) towers."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..config import CLIPConfig, CoCaDecoderConfig
from .keymap import KeyMap, Rule, block_rules, transpose
from .layers import MLP, OPEN_CLIP_BLOCK_KEYS, Attention, Block, _outputs, init_blocks

_MLP_RATIO = 4.0  # OpenCLIP's MultimodalTransformer is built without its config's mlp_ratio: always 4


class CrossAttention(Attention):
    """Multi-head attention from queries (B, L, D) to a context (B, N, D), with the self-attention's parameters
    (nn.MultiheadAttention's packed projection): rows 0:D of `qkv` make the queries, D:3D the keys and values."""

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, L, D = x.shape
        Dh = D // self.heads
        q = _outputs(self.qkv, x, 0, D).view(B, L, self.heads, Dh).transpose(1, 2)  # (B, H, L, Dh)
        kv = _outputs(self.qkv, context, D, 3 * D)  # (B, N, 2D)
        k, v = kv.view(B, -1, 2, self.heads, Dh).permute(2, 0, 3, 1, 4)  # 2 x (B, H, N, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, Dh)
        return self.out(x.transpose(1, 2).reshape(B, L, D))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block: x + attn(ln_1(x), ln_1_kv(context)), then x + mlp(ln_2(x))."""

    int8_linears = ("attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2")  # what `quant.quantize_int8` replaces

    def __init__(self, width: int, heads: int, act: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.ln_1_kv = nn.LayerNorm(width)
        self.attn = CrossAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * _MLP_RATIO), act)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), self.ln_1_kv(context))
        return x + self.mlp(self.ln_2(x))


class CaptionDecoder(nn.Module):
    """CoCa's caption decoder: for each layer a causal self-attention block, then a cross-attention block over the
    image's caption tokens; a final LayerNorm and a projection to the vocabulary."""

    def __init__(self, cfg: CoCaDecoderConfig):
        super().__init__()
        self.config = cfg
        D = cfg.width
        self.blocks = nn.ModuleList(Block(D, cfg.heads, _MLP_RATIO, cfg.act, 1e-5) for _ in range(cfg.layers))
        self.cross_blocks = nn.ModuleList(CrossBlock(D, cfg.heads, cfg.act) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(D)
        self.proj = nn.Linear(D, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        # OpenCLIP's init for its text towers (it leaves its decoder at PyTorch's defaults, the projection
        # uninitialised): residual projections shrink with depth.
        init_blocks([*self.blocks, *self.cross_blocks], self.config.width, self.config.layers)
        nn.init.normal_(self.proj.weight, std=self.config.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _run(self, block: nn.Module, *args) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, image_tokens: Tensor, text_states: Tensor) -> Tensor:
        """Logits (B, L, V) over the next token at each text position, OpenCLIP's `CoCa.forward(...)["logits"]`
        (with `output_labels=False`; OpenCLIP's default drops the last position, which no label follows).

        Args:
            image_tokens: the image tower's caption tokens, (B, N, D) (`VisionTransformer.forward_caption_tokens`).
            text_states: the text tower's last-block states at the token positions, (B, L, D), before its final
                LayerNorm, with L at most `context_length`.
        """
        L = text_states.shape[1]
        if L > self.config.context_length:
            raise ValueError(f"text of {L} positions exceeds the decoder's context length {self.config.context_length}")
        x = text_states
        for block, cross in zip(self.blocks, self.cross_blocks):
            x = self._run(block, x, True)
            x = self._run(cross, x, image_tokens)
        return self.proj(self.ln_final(x))


def build_caption_decoder(cfg: CLIPConfig) -> CaptionDecoder:
    """The decoder of a CoCa config, after checking that its towers feed it: a text tower pooled at CoCa's class
    embedding, and an image tower whose caption tokens (its attentional pool's queries, or its patch tokens) are as
    wide as the decoder.

    Raises:
        ValueError: towers that cannot feed the decoder, named.
    """
    d, v, t = cfg.decoder, cfg.vision, cfg.text
    if v is None or t is None:
        raise ValueError("a caption decoder needs both towers")
    if v.kind != "vit" or v.pool not in ("attentional", "cls"):
        raise ValueError("a caption decoder needs a ViT image tower with pool='attentional' or 'cls'")
    if t.kind != "transformer" or t.pool != "cls":
        raise ValueError("a caption decoder needs CLIP's text tower with pool='cls' (CoCa's class embedding)")
    image_width = cfg.embed_dim if v.pool == "attentional" else v.width
    if d.width != t.width or d.width != image_width:
        raise ValueError(f"decoder.width {d.width} must equal the text width {t.width} and the caption tokens' width "
                         f"{image_width} (embed_dim with the attentional pool, else the ViT's width)")  # fmt: skip
    if d.context_length < t.context_length:
        raise ValueError(f"decoder.context_length {d.context_length} is shorter than the text's {t.context_length}")
    return CaptionDecoder(d)


_CROSS_BLOCK_KEYS = (*OPEN_CLIP_BLOCK_KEYS, ("ln_1_kv.weight", "ln_1_kv.weight"), ("ln_1_kv.bias", "ln_1_kv.bias"))
OPEN_CLIP_KEYMAP = KeyMap(
    [
        *block_rules("resblocks", "blocks", OPEN_CLIP_BLOCK_KEYS),
        *block_rules("cross_attn", "cross_blocks", _CROSS_BLOCK_KEYS),
        Rule("ln_final.weight", "ln_final.weight"),
        Rule("ln_final.bias", "ln_final.bias"),
        Rule("proj.weight", "text_projection", transpose, transpose),
    ]
)


def convert_from_open_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP's `text_decoder.` subtree (without the prefix) to our CaptionDecoder keys."""
    return OPEN_CLIP_KEYMAP.to_ours(sd)


def convert_to_open_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our CaptionDecoder keys to OpenCLIP's `text_decoder.` subtree (without the prefix)."""
    return OPEN_CLIP_KEYMAP.to_theirs(sd)
