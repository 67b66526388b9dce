"""Long prompts as 75-token chunks (AUTOMATIC1111's scheme), and prompt weights applied to hidden states.

A prompt's tokens are cut into chunks of at most 75; each chunk is framed as `[start, tokens..., end, pad...]`
to the 77-position context and encoded on its own, and the chunks' states are concatenated along the sequence.
A chunk ends early at `BREAK`, and, when it fills up, at its last comma if that comma is within
`comma_backtrack` tokens of the end (the words after it move to the next chunk, so a phrase is not cut).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..tokenizer import Tokenizer
from .syntax import Segment

CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20


class Chunk(NamedTuple):
    """One chunk's text token ids (no start/end) and the weight of each."""

    ids: list[int]
    weights: list[float]


def split_chunks(
    segments: Sequence[Segment],
    tokenizer: Tokenizer,
    chunk_length: int = CHUNK_LENGTH,
    comma_backtrack: int = COMMA_BACKTRACK,
    encode: Callable[[str], list[list[int]]] | None = None,
) -> list[Chunk]:
    """Tokenize parsed segments into chunks of at most `chunk_length` tokens (at least one chunk).

    Args:
        segments: a parsed prompt (`parse_prompt` or `plain_prompt`).
        tokenizer: the CLIP tokenizer (each segment is tokenized on its own, as A1111 does).
        chunk_length: text tokens per chunk (the context length minus start and end).
        comma_backtrack: a full chunk whose last comma is at most this many tokens from its end is cut after
            that comma; 0 turns it off.
        encode: a segment's text to units of ids that a chunk keeps whole (a textual-inversion embedding's
            vectors: a unit that does not fit starts the next chunk, as in A1111); default: each token alone.
    """
    if chunk_length < 1 or comma_backtrack < 0:
        raise ValueError(f"need chunk_length >= 1 and comma_backtrack >= 0, got {chunk_length}, {comma_backtrack}")
    (comma,) = tokenizer.encode(",")
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append(Chunk(ids, weights))
        ids, weights, last_comma = [], [], -1

    for segment in segments:
        if segment.is_break:
            close()
            continue
        for unit in encode(segment.text) if encode else ([t] for t in tokenizer.encode(segment.text)):
            token = unit[0]
            if len(unit) > chunk_length:
                raise ValueError(f"{len(unit)} ids that stay together cannot fit a chunk of {chunk_length}")
            if token == comma:
                last_comma = len(ids)
            elif (
                comma_backtrack
                and len(ids) == chunk_length
                and 0 <= last_comma
                and len(ids) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                rest = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = rest
            if len(ids) + len(unit) > chunk_length:
                close()
            ids += unit
            weights += [segment.weight] * len(unit)
    if ids or not chunks:
        close()
    return chunks


class FramedChunks(NamedTuple):
    """Every prompt's chunks framed for the encoder, prompt-major.

    Attributes:
        ids: (B * C, chunk_length + 2) token ids.
        weights: (B * C, chunk_length + 2) weight of each position (1 on start, end and padding).
        chunks: C, chunks per prompt (shorter prompts are padded with empty chunks).
    """

    ids: Tensor
    weights: Tensor
    chunks: int


def frame_chunks(
    prompts: Sequence[list[Chunk]], tokenizer: Tokenizer, pad_id: int, chunks: int | None = None,
    chunk_length: int = CHUNK_LENGTH,
) -> FramedChunks:  # fmt: skip
    """Frame each chunk as `[start, ids..., end, pad...]`; every prompt gets `chunks` chunks (default: the most
    any prompt has), the missing ones empty (`[start, end, pad...]`)."""
    count = max(len(p) for p in prompts) if chunks is None else chunks
    if count < max(len(p) for p in prompts):
        raise ValueError(f"chunks={count} is fewer than a prompt has ({max(len(p) for p in prompts)})")
    width = chunk_length + 2
    ids = torch.full((len(prompts), count, width), pad_id, dtype=torch.long)  # (B, C, L)
    weights = torch.ones(len(prompts), count, width)
    ids[:, :, 0] = tokenizer.sot_token_id
    ids[:, :, 1] = tokenizer.eot_token_id  # empty chunks; a filled one has its end token moved below
    for b, prompt in enumerate(prompts):
        for c, chunk in enumerate(prompt):
            n = len(chunk.ids)
            ids[b, c, 1 : n + 1] = torch.tensor(chunk.ids, dtype=torch.long)
            ids[b, c, n + 1] = tokenizer.eot_token_id
            weights[b, c, 1 : n + 1] = torch.tensor(chunk.weights)
    return FramedChunks(ids.flatten(0, 1), weights.flatten(0, 1), count)


def apply_weights(hidden: Tensor, weights: Tensor) -> Tensor:
    """Scale each position's state (N, L, D) by its weight (N, L), then rescale each sequence so that its mean
    is what it was (AUTOMATIC1111's normalisation; A1111 takes the mean over the whole batch, here each
    sequence keeps its own, so a prompt's result does not depend on its batch). All-one weights are a no-op."""
    if bool((weights == 1).all()):
        return hidden
    weights = weights.to(hidden.dtype)
    mean = hidden.mean(dim=(1, 2), keepdim=True)  # (N, 1, 1)
    scaled = hidden * weights[..., None]  # (N, L, D)
    return scaled * (mean / scaled.mean(dim=(1, 2), keepdim=True))
