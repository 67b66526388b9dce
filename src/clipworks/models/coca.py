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
        return self.proj(self.ln_final(self.forward_states(image_tokens, text_states)))

    def forward_states(self, image_tokens: Tensor, text_states: Tensor) -> Tensor:
        """The last block's states (B, L, D), before the final LayerNorm: `forward` without its vocabulary projection
        (generation projects the last position only)."""
        L = text_states.shape[1]
        if L > self.config.context_length:
            raise ValueError(f"text of {L} positions exceeds the decoder's context length {self.config.context_length}")
        x = text_states
        for block, cross in zip(self.blocks, self.cross_blocks):
            x = self._run(block, x, True)
            x = self._run(cross, x, image_tokens)
        return x


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


# --- caption generation: OpenCLIP's `CoCa.generate`, with transformers' logits processors rewritten in torch ---

GENERATION_TYPES = ("beam_search", "top_p", "top_k")
SOT_TOKEN_ID, EOS_TOKEN_ID = 49406, 49407  # the CLIP tokenizer's <start_of_text> and <end_of_text>


def _min_length(tokens: Tensor, logits: Tensor, min_seq_len: int, eos: int) -> Tensor:
    """No end of text before `min_seq_len` positions (transformers' MinLengthLogitsProcessor)."""
    if tokens.shape[-1] < min_seq_len:
        logits = logits.clone()
        logits[:, eos] = -float("inf")
    return logits


def _repetition_penalty(tokens: Tensor, logits: Tensor, penalty: float) -> Tensor:
    """Every token already present made less likely: its logit divided by `penalty` if positive, else multiplied (Keskar
    et al. 2019; transformers' RepetitionPenaltyLogitsProcessor, ids past the vocabulary ignored)."""
    V = logits.shape[-1]
    tokens = tokens.clamp(max=V)  # ids the head cannot emit land in a padding column, dropped below
    padded = F.pad(logits, (0, 1))  # (B, V + 1)
    seen = padded.gather(1, tokens)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, tokens, seen)[:, :V]


def _top_k(logits: Tensor, k: int) -> Tensor:
    """All but the `k` largest logits (and those tied with the k-th) set to -inf."""
    k = min(max(k, 1), logits.shape[-1])
    kth = torch.topk(logits, k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, -float("inf"))


def _top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2020), transformers' way: the least likely tokens whose probabilities sum to
    at most 1 - p set to -inf; the most likely token always stays."""
    ascending, order = torch.sort(logits, descending=False)
    remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def _check_generation(generation_type: str, seq_len: int, min_seq_len: int, top_p: float) -> None:
    if generation_type not in GENERATION_TYPES:
        raise ValueError(f"generation_type {generation_type!r} is not one of {', '.join(GENERATION_TYPES)}")
    if seq_len <= min_seq_len:
        raise ValueError(f"seq_len ({seq_len}) must be larger than min_seq_len ({min_seq_len})")
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p must lie in [0, 1], got {top_p}")


def next_token_logits(model: nn.Module, image_tokens: Tensor, tokens: Tensor) -> Tensor:
    """The logits (B, V) of the token after `tokens` (B, L), given the image tower's caption tokens (B, N, D)."""
    text_states = model.text.forward_hidden(tokens).hidden_states[-1]  # (B, L, D), before ln_final
    decoder = model.decoder
    last = decoder.forward_states(image_tokens, text_states)[:, -1]  # (B, D): only it is projected to the vocabulary
    return decoder.proj(decoder.ln_final(last))


def _sample(model, images, out, process, warp, *, eos, pad, seq_len, max_seq_len, temperature, fixed_output_length,
            generator) -> Tensor:
    """OpenCLIP's top-k / top-p loop: one token per step for every caption not yet ended, the whole prefix re-read."""
    image_tokens = model.visual.forward_caption_tokens(images)  # (B, N, D)
    while True:
        x = out[:, -max_seq_len:]  # (B, L)
        logits = next_token_logits(model, image_tokens, x)  # (B, V)
        done = (out[:, -1] == eos) | (out[:, -1] == pad)
        sample = torch.full((out.shape[0], 1), pad, device=out.device, dtype=torch.long)
        if done.all():
            if not fixed_output_length:
                return out
        else:
            live = x[~done]
            probs = F.softmax(warp(process(live, logits[~done])) / temperature, dim=-1)
            # the last position is always end of text; elsewhere a draw, even when one token is left, so that the
            # generator advances exactly as OpenCLIP's does
            last = x.shape[1] + 1 == seq_len
            sample[~done] = eos if last else torch.multinomial(probs, 1, generator=generator)
        out = torch.cat((out, sample), dim=-1)  # (B, L + 1)
        if out.shape[-1] >= seq_len:
            return out


@torch.no_grad()
def generate(
    model: nn.Module,
    images: Tensor,
    *,
    generation_type: str = "beam_search",
    seq_len: int = 30,
    max_seq_len: int = 77,
    temperature: float = 1.0,
    top_p: float = 0.1,
    top_k: int = 1,
    num_beams: int = 6,
    num_beam_groups: int = 3,
    min_seq_len: int = 5,
    repetition_penalty: float = 1.0,
    fixed_output_length: bool = False,
    sot_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    text: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Caption token ids for each image, as OpenCLIP's `CoCa.generate` makes them, token for token: (B, T), starting
    with the start-of-text token (or `text`), ending with end-of-text (or cut at `seq_len`), then `pad_token_id`.

    Sampling ("top_p"; "top_k" with `top_k > 1`) draws with `torch.multinomial` from the global generator, as OpenCLIP
    does: the same `torch.manual_seed` gives the same captions. "top_k" with `top_k=1` is greedy decoding.

    Args:
        model: a CoCa `CLIP` (one with a caption decoder).
        images: preprocessed images (B, 3, H, W).
        generation_type: "beam_search" (group beam search, `models.coca_beam`), "top_k" (greedy with `top_k=1`) or
            "top_p".
        seq_len: the longest output, in tokens (the start token included).
        max_seq_len: how many of the latest tokens the decoder reads at each step.
        temperature: divides the filtered logits before sampling.
        top_p: nucleus size for "top_p": the smallest set of tokens whose probabilities sum to more than it.
        top_k: how many of the likeliest tokens "top_k" samples from.
        num_beams, num_beam_groups: beams per image and the groups they are split into ("beam_search").
        min_seq_len: no end of text before this many tokens.
        repetition_penalty: > 1 makes tokens already emitted less likely.
        fixed_output_length: pad every output to `seq_len` tokens.
        sot_token_id, eos_token_id, pad_token_id: the start, end and padding ids (the CLIP tokenizer's, and the text
            tower's `pad_id`, unless given).
        text: tokens (B, L) or (L,) to continue instead of a lone start token ("top_k", "top_p"); a 1-D `text` gives a
            1-D output.
        generator: draws from this generator instead of the global one.

    Raises:
        ValueError: a model without a caption decoder, or a generation setting out of range.
    """
    if getattr(model, "decoder", None) is None:
        raise ValueError("this model has no caption decoder: only CoCa models can generate captions")
    _check_generation(generation_type, seq_len, min_seq_len, top_p)
    sot = SOT_TOKEN_ID if sot_token_id is None else int(sot_token_id)
    eos = EOS_TOKEN_ID if eos_token_id is None else int(eos_token_id)
    pad = model.text.config.pad_id if pad_token_id is None else int(pad_token_id)

    def process(tokens: Tensor, logits: Tensor) -> Tensor:  # OpenCLIP's logits processors, in its order
        return _repetition_penalty(tokens, _min_length(tokens, logits, min_seq_len, eos), repetition_penalty)

    was_training = model.training
    model.eval()
    try:
        if generation_type == "beam_search":
            if text is not None:
                raise ValueError("beam_search starts from the start token alone: `text` is for 'top_k' and 'top_p'")
            from .coca_beam import beam_search

            out = beam_search(model, images, sot=sot, eos=eos, pad=pad, seq_len=seq_len, num_beams=num_beams,
                              num_beam_groups=num_beam_groups, process=process)  # fmt: skip
            if fixed_output_length and out.shape[1] < seq_len:
                out = F.pad(out, (0, seq_len - out.shape[1]), value=pad)  # (B, seq_len)
            return out
        warp = (lambda x: _top_p(x, top_p)) if generation_type == "top_p" else (lambda x: _top_k(x, top_k))
        if text is None:
            text = torch.full((images.shape[0], 1), sot, device=images.device, dtype=torch.long)
        out = _sample(model, images, text[None] if text.dim() == 1 else text, process, warp, eos=eos, pad=pad,
                      seq_len=seq_len, max_seq_len=max_seq_len, temperature=temperature,
                      fixed_output_length=fixed_output_length, generator=generator)  # fmt: skip
        return out[0] if text.dim() == 1 else out
    finally:
        model.train(was_training)
