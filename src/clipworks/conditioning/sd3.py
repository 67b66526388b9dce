"""SD3's and Flux's text conditioning: CLIP text towers beside a T5 encoder, as diffusers' `encode_prompt`.

SD3 (`StableDiffusion3Pipeline`): CLIP-L's and CLIP-G's chosen hidden states side by side, (B, 77, 768 + 1280),
zero-padded on the feature axis to T5's width and followed on the sequence axis by T5's last hidden state:
(B, 77 + T, 4096); the pooled embedding is both CLIP projections side by side, (B, 768 + 1280).
Flux (`FluxPipeline`): T5's last hidden state (B, T, 4096), CLIP-L's pooled output (B, 768), and `text_ids`, the
zeros (T, 3) of the text's positions in Flux's rotary embedding.

T5 reads the whole padded sequence without an attention mask (diffusers passes none), padded to
`max_sequence_length` and cut there, end token kept. The CLIP parts read prompts through a `PromptReader`, as
`SDXLText` does: with `PromptReader(syntax="plain", truncate=True)` the outputs are diffusers'; the default adds
AUTOMATIC1111's weights and 75-token chunks to SD3's CLIP states (Flux uses only CLIP's pooled output, which
weights do not change). T5 always reads the prompt's text with the syntax taken out, unweighted.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.text import TextTransformer
from ..tokenizer import TextTokenizer
from .chunks import frame_chunks
from .pipelines import PAD_END, PAD_ZERO, PromptReader, _as_list, encode_chunks
from .skip import ClipSkip, TextStates
from .t5 import T5Encoder, as_t5_encoder

SD3_MAX_SEQUENCE_LENGTH = 256
FLUX_MAX_SEQUENCE_LENGTH = 512
SD3_T5_WIDTH = 4096  # the transformer's joint_attention_dim: T5-XXL's width, the zeros' width without T5


class SD3Conditioning(NamedTuple):
    """SD3 conditioning (diffusers' `encode_prompt` order): `embeds` (B, C * 77 + T, D_t5) and `pooled`
    (B, E1 + E2), for the prompts and the negative prompts. B counts `num_images_per_prompt` copies."""

    embeds: Tensor
    negative_embeds: Tensor
    pooled: Tensor
    negative_pooled: Tensor


class FluxConditioning(NamedTuple):
    """Flux conditioning (diffusers' `encode_prompt` order): T5's `embeds` (B, T, D_t5), CLIP-L's `pooled` (B, D),
    and `text_ids`, zeros (T, 3) in CLIP-L's dtype."""

    embeds: Tensor
    pooled: Tensor
    text_ids: Tensor


def _check_copies(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {n!r}")


def _copies(x: Tensor, n: int) -> Tensor:
    """Each prompt's row `n` times in a row, as diffusers' `repeat(1, n, ...).view(B * n, ...)`."""
    return x.repeat_interleave(n, dim=0)


def _plain_text(reader: PromptReader, prompt: str) -> str:
    """The prompt as T5 reads it: its text with the reader's syntax (weights, brackets, BREAK) taken out."""
    return "".join(" " if s.is_break else s.text for s in reader.parse(prompt))


def _sequence_length(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_sequence_length must be an int >= 1, got {value!r}")
    return value


def encode_t5(t5: T5Encoder, tokenizer: TextTokenizer, texts: Sequence[str], max_sequence_length: int) -> Tensor:
    """T5's last hidden state (B, T, D) for texts padded and cut to T = `max_sequence_length` tokens (end token
    kept), attending to every position as diffusers does; warns when a text is cut."""
    length = _sequence_length(max_sequence_length)
    cut = [t for t in texts if len(tokenizer.encode(t)) + 1 > length]
    if cut:
        warnings.warn(f"{len(cut)} prompt(s) cut at max_sequence_length={length} T5 tokens: {cut[0][:60]!r}...",
                      stacklevel=4)  # fmt: skip
    ids = tokenizer(list(texts), context_length=length)  # (B, T)
    return t5(ids.to(t5.device))


def _negatives(negative: str | Sequence[str] | None, count: int, name: str) -> list[str]:
    items = [""] * count if negative is None else _as_list(negative, name)
    if len(items) != count:
        raise ValueError(f"{len(items)} {name} for {count} prompts; give one each")
    return items


class SD3Text:
    """SD3's text conditioning: CLIP ViT-L/14 text, OpenCLIP ViT-bigG/14 text (both with projections) and T5-XXL.

    Args:
        clip_l: diffusers' `text_encoder` (a clipworks text tower: `load_text_encoder`).
        clip_g: diffusers' `text_encoder_2`.
        t5: diffusers' `text_encoder_3` (`load_t5_encoder`); None runs without it, as SD3 allows: zeros in its place.
        t5_tokenizer: T5's tokenizer (`HFTokenizer` on diffusers' `tokenizer_3/`); None when `t5` is None.
        reader: how prompts become CLIP chunks (A1111 syntax and long prompts by default).
        pad_ids: each CLIP tokenizer's padding id (SD3: the end token for CLIP-L, 0 for CLIP-G).
        max_sequence_length: T5's tokens per prompt (diffusers' default 256).
        t5_width: the width of T5's zeros when `t5` is None (the transformer's joint_attention_dim).
    """

    def __init__(self, clip_l: TextTransformer, clip_g: TextTransformer, t5: T5Encoder | None,
                 t5_tokenizer: TextTokenizer | None, reader: PromptReader | None = None,
                 pad_ids: tuple[int, int] = (PAD_END, PAD_ZERO), max_sequence_length: int = SD3_MAX_SEQUENCE_LENGTH,
                 t5_width: int = SD3_T5_WIDTH):  # fmt: skip
        if t5 is not None and t5_tokenizer is None:
            raise ValueError("t5_tokenizer is None: give T5's tokenizer with the T5 encoder")
        self.clips = (clip_l, clip_g)
        self.t5, self.t5_tokenizer = (as_t5_encoder(t5) if t5 is not None else None), t5_tokenizer
        self.reader = reader or PromptReader()
        self.pad_ids = pad_ids
        self.max_sequence_length = _sequence_length(max_sequence_length)
        self.t5_width = self.t5.width if self.t5 is not None else t5_width
        # textual inversion: each CLIP tower's vectors (an SDXL-style clip_l/clip_g pair); T5 reads the trigger as text
        self.extras = tuple(self.reader.inversion.vectors(enc, i, 2) for i, enc in enumerate(self.clips))

    def _clip(self, chunks: tuple[list, list], layer: ClipSkip, count: int) -> TextStates:
        """Both CLIP towers' states side by side (B, C * 77, D1 + D2) and pooled projections (B, E1 + E2)."""
        tok = self.reader.tokenizer
        states = [
            encode_chunks(enc, frame_chunks(c, tok, pad, count), layer, pooled=True, extra=extra)
            for enc, c, pad, extra in zip(self.clips, chunks, self.pad_ids, self.extras)
        ]
        return TextStates(torch.cat([s.hidden for s in states], -1), torch.cat([s.pooled for s in states], -1))

    def _t5(self, prompts: list[str], length: int) -> Tensor:
        if self.t5 is None:
            clip_l = self.clips[0].token_embed.weight
            return torch.zeros(len(prompts), length, self.t5_width, dtype=clip_l.dtype, device=clip_l.device)
        return encode_t5(self.t5, self.t5_tokenizer, [_plain_text(self.reader, p) for p in prompts], length)

    def _encode(self, chunks: tuple[list, list], t5_texts: list[str], layer: ClipSkip, count: int, length: int
                ) -> TextStates:  # fmt: skip
        """CLIP-L's and CLIP-G's chunks and T5's texts to the joint sequence (B, C * 77 + T, D_t5) and the pooled
        embedding (B, E1 + E2)."""
        clip = self._clip(chunks, layer, count)
        t5 = self._t5(t5_texts, length)  # (B, T, D_t5)
        if clip.hidden.shape[-1] > t5.shape[-1]:
            raise ValueError(f"the CLIP states' width {clip.hidden.shape[-1]} exceeds T5's {t5.shape[-1]}")
        hidden = F.pad(clip.hidden, (0, t5.shape[-1] - clip.hidden.shape[-1]))  # (B, C * 77, D_t5)
        return TextStates(torch.cat([hidden, t5], dim=-2), clip.pooled)  # (B, C * 77 + T, D_t5)

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        negative_prompts: str | Sequence[str] | None = None,
        prompts_2: str | Sequence[str] | None = None,
        prompts_3: str | Sequence[str] | None = None,
        negative_prompts_2: str | Sequence[str] | None = None,
        negative_prompts_3: str | Sequence[str] | None = None,
        layer: ClipSkip | None = None,
        negative_layer: ClipSkip | None = None,
        max_sequence_length: int | None = None,
        num_images_per_prompt: int = 1,
    ) -> SD3Conditioning:
        """Conditioning for prompts and negative prompts (None: the empty prompt, encoded, as diffusers does).

        `*_2` go to CLIP-G and `*_3` to T5 (default: the prompt itself, or the negative prompt).

        Args:
            layer: the CLIP state both towers give (default `ClipSkip.sdxl()`: the penultimate, no LayerNorm;
                diffusers' `clip_skip=k` is `ClipSkip.sdxl(k)`).
            negative_layer: the same for the negative prompts; None for `layer` (diffusers: `ClipSkip.sdxl()`).
            max_sequence_length: T5's tokens per prompt; None for the constructor's.
            num_images_per_prompt: copies of each prompt's conditioning, one after another.
        """
        pos = _as_list(prompts, "prompts")
        pos = (pos, pos if prompts_2 is None else _as_list(prompts_2, "prompts_2"),
               pos if prompts_3 is None else _as_list(prompts_3, "prompts_3"))  # fmt: skip
        neg = _negatives(negative_prompts, len(pos[0]), "negative_prompts")
        neg = (neg, _negatives(negative_prompts_2, len(neg), "negative_prompts_2") if negative_prompts_2 else neg,
               _negatives(negative_prompts_3, len(neg), "negative_prompts_3") if negative_prompts_3 else neg)
        if len({len(p) for p in pos + neg}) != 1:
            raise ValueError("prompts, prompts_2, prompts_3 and the negative prompts must have one item per prompt")
        length = self.max_sequence_length if max_sequence_length is None else _sequence_length(max_sequence_length)
        _check_copies(num_images_per_prompt)
        layer = layer or ClipSkip.sdxl()
        pos_chunks, neg_chunks = [tuple(map(self.reader.chunks, texts[:2])) for texts in (pos, neg)]
        count = max(map(len, pos_chunks[0] + pos_chunks[1] + neg_chunks[0] + neg_chunks[1]))  # both halves line up
        cond = self._encode(pos_chunks, pos[2], layer, count, length)
        uncond = self._encode(neg_chunks, neg[2], negative_layer or layer, count, length)
        n = num_images_per_prompt
        return SD3Conditioning(*(_copies(x, n) for x in (cond.hidden, uncond.hidden, cond.pooled, uncond.pooled)))


class FluxText:
    """Flux's text conditioning: CLIP ViT-L/14 text's pooled output and T5-XXL's hidden states.

    Args:
        clip_l: diffusers' `text_encoder`, a `CLIPTextModel` (no projection: its pooled output is the final-normed
            end-token state; `load_text_encoder` gives such a tower an identity projection).
        t5: diffusers' `text_encoder_2` (`load_t5_encoder`).
        t5_tokenizer: T5's tokenizer (`HFTokenizer` on diffusers' `tokenizer_2/`).
        reader: how prompts become CLIP tokens (only the first chunk's pooled output is used).
        pad_id: the CLIP tokenizer's padding id (Flux: the end token).
        max_sequence_length: T5's tokens per prompt (diffusers' default 512; FLUX.1-schnell is run with 256).
    """

    def __init__(self, clip_l: TextTransformer, t5: T5Encoder, t5_tokenizer: TextTokenizer,
                 reader: PromptReader | None = None, pad_id: int = PAD_END,
                 max_sequence_length: int = FLUX_MAX_SEQUENCE_LENGTH):  # fmt: skip
        self.clip_l, self.t5, self.t5_tokenizer = clip_l, as_t5_encoder(t5), t5_tokenizer
        self.reader = reader or PromptReader()
        self.pad_id = pad_id
        self.max_sequence_length = _sequence_length(max_sequence_length)
        self.extra = self.reader.inversion.vectors(clip_l)  # textual inversion (CLIP-L); T5 reads the trigger as text

    @torch.no_grad()
    def __call__(self, prompts: str | Sequence[str], prompts_2: str | Sequence[str] | None = None,
                 max_sequence_length: int | None = None, num_images_per_prompt: int = 1,
                 ) -> FluxConditioning:  # fmt: skip
        """Conditioning for prompts; `prompts_2` go to T5 (default: the same). Flux has no negative prompt (for
        true classifier-free guidance, call again with the negative prompts).

        Args:
            max_sequence_length: T5's tokens per prompt; None for the constructor's.
            num_images_per_prompt: copies of each prompt's conditioning, one after another.
        """
        prompts = _as_list(prompts, "prompts")
        prompts_2 = prompts if prompts_2 is None else _as_list(prompts_2, "prompts_2")
        if len(prompts_2) != len(prompts):
            raise ValueError(f"{len(prompts_2)} prompts_2 for {len(prompts)} prompts; give one each")
        length = self.max_sequence_length if max_sequence_length is None else _sequence_length(max_sequence_length)
        _check_copies(num_images_per_prompt)
        first = [c[:1] for c in self.reader.chunks(prompts)]
        framed = frame_chunks(first, self.reader.tokenizer, self.pad_id, 1)
        pooled = encode_chunks(self.clip_l, framed, ClipSkip(), pooled=True, extra=self.extra).pooled  # (B, D)
        embeds = encode_t5(self.t5, self.t5_tokenizer, [_plain_text(self.reader, p) for p in prompts_2], length)
        dtype, device = self.clip_l.token_embed.weight.dtype, self.clip_l.token_embed.weight.device
        text_ids = torch.zeros(embeds.shape[1], 3, dtype=dtype, device=device)  # (T, 3)
        n = num_images_per_prompt
        return FluxConditioning(_copies(embeds, n), _copies(pooled, n), text_ids)
