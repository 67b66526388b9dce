"""Stable Diffusion's text conditioning: SD 1.x/2.x (one encoder) and SDXL (two), with long and weighted prompts.

With `syntax="plain"` and `truncate=True` the outputs are those of diffusers' `encode_prompt`; the defaults add
AUTOMATIC1111's prompt weights, `BREAK` and 75-token chunks, which leave a plain prompt of up to 75 tokens
unchanged. One difference from diffusers is a choice: the layer a negative prompt is read from is
`negative_layer`, by default the prompt's `layer` (diffusers reads it from the default layer whatever
`clip_skip` says; pass `negative_layer=ClipSkip.diffusers()` / `ClipSkip.sdxl()` to reproduce that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..models.text import TextTransformer
from ..tokenizer import Tokenizer, default_tokenizer
from .compel_encode import CompelChunks, encode_compel
from .chunks import COMMA_BACKTRACK, Chunk, FramedChunks, apply_weights, frame_chunks, split_chunks
from .embeddings import Embedding, TextualInversion
from .skip import ClipSkip, TextStates, encode_hidden
from .compel_syntax import parse_compel
from .syntax import parse_prompt, plain_prompt

SYNTAXES = {"a1111": parse_prompt, "plain": plain_prompt, "compel": parse_compel}
# Each tokenizer's own padding: SD 1.x's CLIP tokenizer pads with the end token, OpenCLIP's with 0 ("!").
PAD_END = 49407
PAD_ZERO = 0


class Conditioning(NamedTuple):
    """SD 1.x/2.x conditioning: `embeds` and `negative_embeds`, (B, C * 77, D) for prompts of C chunks."""

    embeds: Tensor
    negative_embeds: Tensor


class SDXLConditioning(NamedTuple):
    """SDXL conditioning: both encoders' states concatenated, (B, C * 77, D1 + D2), and the second encoder's
    pooled projection of the first chunk, (B, E2), for the prompts and the negative prompts."""

    embeds: Tensor
    negative_embeds: Tensor
    pooled: Tensor
    negative_pooled: Tensor


def _as_list(prompts: str | Sequence[str], name: str) -> list[str]:
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{name} must be a str or a non-empty sequence of str")
    return items


class PromptReader:
    """Prompt text to token chunks, shared by every encoder of a pipeline (so SDXL's two get aligned chunks).

    Args:
        tokenizer: the CLIP tokenizer; the shared default if None.
        syntax: "a1111" (weights in brackets, `BREAK`), "plain" (the text as it is, like diffusers) or "compel"
            (compel's syntax and math, see `compel_encode`; each `.and()` part is cut at 75 tokens).
        truncate: keep only the first chunk, cut at 75 tokens (diffusers); otherwise long prompts are chunked.
        comma_backtrack: see `split_chunks` (A1111's default 20; 0 turns it off).
        embeddings: textual-inversion embeddings (`load_embedding`) whose triggers prompts may use.
    """

    def __init__(self, tokenizer: Tokenizer | None = None, syntax: str = "a1111", truncate: bool = False,
                 comma_backtrack: int = COMMA_BACKTRACK, embeddings: Sequence[Embedding] = ()):  # fmt: skip
        if syntax not in SYNTAXES:
            raise ValueError(f"unknown prompt syntax {syntax!r}; expected one of {sorted(SYNTAXES)}")
        self.tokenizer = tokenizer or default_tokenizer()
        self.syntax = syntax
        self.parse = SYNTAXES[syntax]
        self.truncate = truncate
        self.comma_backtrack = 0 if truncate else comma_backtrack
        self.inversion = TextualInversion(embeddings, self.tokenizer)

    def chunks(self, prompts: Sequence[str]) -> list[list[Chunk]]:
        """Each prompt's chunks (one only when truncating); with compel's syntax, its `.and()` parts."""
        if self.syntax == "compel":
            return [CompelChunks(p) for p in prompts]
        encode = self.inversion.encode if self.inversion else None
        out = [split_chunks(self.parse(p), self.tokenizer, comma_backtrack=self.comma_backtrack, encode=encode)
               for p in prompts]  # fmt: skip
        return [p[:1] for p in out] if self.truncate else out


def encode_chunks(encoder: TextTransformer, framed: FramedChunks, layer: ClipSkip, pooled: bool = False,
                  extra: Tensor | None = None) -> TextStates:  # fmt: skip
    """Encode framed chunks, weight them, and join each prompt's chunks: hidden (B, C * L, D); pooled (B, E) is
    the first chunk's (as A1111 does for SDXL). `extra`: textual-inversion vectors (see `encode_hidden`)."""
    device = encoder.token_embed.weight.device
    states = encode_hidden(encoder, framed.ids.to(device), layer, pooled=pooled, extra=extra)
    hidden = apply_weights(states.hidden, framed.weights.to(device))  # (B * C, L, D)
    B = hidden.shape[0] // framed.chunks
    hidden = hidden.reshape(B, framed.chunks * hidden.shape[1], hidden.shape[2])  # (B, C * L, D)
    first = None if states.pooled is None else states.pooled.reshape(B, framed.chunks, -1)[:, 0]  # (B, E)
    return TextStates(hidden, first)


class StableDiffusionText:
    """SD 1.x/2.x's text conditioning from one text tower.

    Args:
        encoder: the text tower (see `load_text_encoder` / `text_encoder_from_transformers`).
        reader: how prompts become chunks; A1111 syntax with long prompts by default.
        pad_id: the tokenizer's padding id (SD 1.x: the end token; SD 2.x's OpenCLIP tokenizer: 0).
    """

    def __init__(self, encoder: TextTransformer, reader: PromptReader | None = None, pad_id: int = PAD_END):
        self.encoder = encoder
        self.reader = reader or PromptReader()
        self.pad_id = pad_id
        self.extra = self.reader.inversion.vectors(encoder)

    @torch.no_grad()
    def __call__(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None,
                 layer: ClipSkip | None = None, negative_layer: ClipSkip | None = None) -> Conditioning:  # fmt: skip
        """Conditioning for prompts and negative prompts (None: the empty prompt, as diffusers).

        Args:
            layer: the hidden state to read (default: the last layer, final-normed; `ClipSkip.a1111(2)` ...).
            negative_layer: the same for the negative prompts; None for `layer`.
        """
        prompts = _as_list(prompts, "prompts")
        negative = [""] * len(prompts) if negative_prompts is None else _as_list(negative_prompts, "negative_prompts")
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one each")
        layer = layer or ClipSkip.diffusers()
        pos, neg = self.reader.chunks(prompts), self.reader.chunks(negative)
        count = max(map(len, pos + neg))
        tok = self.reader.tokenizer
        if self.reader.syntax == "compel":
            pairs = ((pos, layer), (neg, negative_layer or layer))
            return Conditioning(*(encode_compel(self.encoder, p, tok, self.pad_id, count, at).hidden
                                  for p, at in pairs))  # fmt: skip
        embeds = encode_chunks(self.encoder, frame_chunks(pos, tok, self.pad_id, count), layer, extra=self.extra).hidden
        negative_layer = negative_layer or layer
        framed = frame_chunks(neg, tok, self.pad_id, count)
        negative_embeds = encode_chunks(self.encoder, framed, negative_layer, extra=self.extra).hidden
        return Conditioning(embeds, negative_embeds)


class SDXLText:
    """SDXL's text conditioning: CLIP ViT-L/14's and OpenCLIP ViT-bigG/14's text towers side by side.

    Args:
        encoder: the first tower (CLIP ViT-L/14 text, diffusers' `text_encoder`).
        encoder_2: the second tower, with its projection (OpenCLIP bigG, diffusers' `text_encoder_2`).
        reader: how prompts become chunks (one reader, so both encoders see the same chunks).
        pad_ids: each tokenizer's padding id (SDXL: the end token for the first, 0 for the second).
        force_zeros_for_empty_prompt: with no negative prompt (None), the negative conditioning is zeros (SDXL
            base's setting); an explicit "" is always encoded.
    """

    def __init__(
        self,
        encoder: TextTransformer,
        encoder_2: TextTransformer,
        reader: PromptReader | None = None,
        pad_ids: tuple[int, int] = (PAD_END, PAD_ZERO),
        force_zeros_for_empty_prompt: bool = True,
    ):
        self.encoders = (encoder, encoder_2)
        self.reader = reader or PromptReader()
        self.pad_ids = pad_ids
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.extras = tuple(self.reader.inversion.vectors(enc, i, 2) for i, enc in enumerate(self.encoders))

    def _encode(self, chunks: tuple[list, list], count: int, layer: ClipSkip) -> TextStates:
        tok = self.reader.tokenizer
        if self.reader.syntax == "compel":
            states = [encode_compel(enc, c, tok, pad, count, layer, pooled=i == 1)
                      for i, (enc, c, pad) in enumerate(zip(self.encoders, chunks, self.pad_ids))]  # fmt: skip
            return TextStates(torch.cat([s.hidden for s in states], dim=-1), states[1].pooled)
        states = [
            encode_chunks(enc, frame_chunks(c, tok, pad, count), layer, pooled=i == 1, extra=extra)
            for i, (enc, c, pad, extra) in enumerate(zip(self.encoders, chunks, self.pad_ids, self.extras))
        ]
        return TextStates(torch.cat([s.hidden for s in states], dim=-1), states[1].pooled)  # (B, C * L, D1 + D2)

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        negative_prompts: str | Sequence[str] | None = None,
        prompts_2: str | Sequence[str] | None = None,
        negative_prompts_2: str | Sequence[str] | None = None,
        layer: ClipSkip | None = None,
        negative_layer: ClipSkip | None = None,
    ) -> SDXLConditioning:
        """Conditioning for prompts and negative prompts; `*_2` go to the second encoder (default: the same).

        Args:
            layer: the hidden state both towers give (default `ClipSkip.sdxl()`: the penultimate, no LayerNorm).
            negative_layer: the same for the negative prompts; None for `layer`.
        """
        prompts = _as_list(prompts, "prompts")
        prompts_2 = prompts if prompts_2 is None else _as_list(prompts_2, "prompts_2")
        zeros = negative_prompts is None and self.force_zeros_for_empty_prompt
        negative = [""] * len(prompts) if negative_prompts is None else _as_list(negative_prompts, "negative_prompts")
        negative_2 = negative if negative_prompts_2 is None else _as_list(negative_prompts_2, "negative_prompts_2")
        if not len(prompts) == len(prompts_2) == len(negative) == len(negative_2):
            raise ValueError(
                "prompts, prompts_2, negative_prompts and negative_prompts_2 must have one item per prompt"
            )
        layer = layer or ClipSkip.sdxl()
        pos = (self.reader.chunks(prompts), self.reader.chunks(prompts_2))
        neg = (self.reader.chunks(negative), self.reader.chunks(negative_2))
        count = max(map(len, pos[0] + pos[1] + ([] if zeros else neg[0] + neg[1])))
        cond = self._encode(pos, count, layer)
        if zeros:
            uncond = TextStates(torch.zeros_like(cond.hidden), torch.zeros_like(cond.pooled))
        else:
            uncond = self._encode(neg, count, negative_layer or layer)
        return SDXLConditioning(cond.hidden, uncond.hidden, cond.pooled, uncond.pooled)
