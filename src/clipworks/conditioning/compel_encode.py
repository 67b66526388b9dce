"""compel's embedding math for prompts parsed by `compel_syntax`: weights, down-weighting by masking, blends, `.and()`.

As compel 2.5's `EmbeddingsProvider` (default settings, `truncate_long_prompts=True`) does it:

- each fragment is tokenized on its own; the tokens are joined and cut at 75, framed `[start, ..., end, pad...]`;
- a token of weight w != 1 gets `empty + (z - empty) * w`, `empty` being the empty prompt's states (no mask);
- each fragment of weight w < 1 also gets a pass with its tokens masked out of attention (their keys hidden), and
  the passes are lerped with weights `[1, tan((1 - w) * pi / 2), ...]` divided by their sum (w is floored at 1e-5);
- a blend is the weighted sum of its prompts' conditionings (weights divided by their sum unless `no_normalize`);
- each `.and()` part is one 77-token block, a part of weight w != 1 is `e + (c - e) * w` with `e` the empty
  prompt's conditioning, and the blocks are concatenated along the sequence (prompts padded with `empty` blocks);
- SDXL's pooled embedding is that of the raw prompt text, syntax characters and all (compel encodes it so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..models.text import TextTransformer
from ..tokenizer import Tokenizer
from .chunks import CHUNK_LENGTH
from .compel_syntax import CompelBlend, CompelConjunction, CompelPrompt, CompelSwap, parse_compel
from .skip import ClipSkip, TextStates, encode_hidden
from .syntax import Segment

_EMPTY = CompelPrompt((Segment("", 1.0),))
_MIN_WEIGHT = 1e-5


class CompelChunks(list):
    """A prompt read in compel's syntax: its parts (one 77-token block each) and its raw text (for the pooled
    embedding). `len()` is the number of blocks."""

    def __init__(self, text: str):
        self.text = text
        self.conjunction: CompelConjunction = parse_compel(text)
        super().__init__(self.conjunction.parts or (_EMPTY,))


def _frame(ids: list[int], tokenizer: Tokenizer, pad_id: int) -> list[int]:
    ids = [tokenizer.sot_token_id, *ids[:CHUNK_LENGTH], tokenizer.eot_token_id]
    return ids + [pad_id] * (CHUNK_LENGTH + 2 - len(ids))


def _masked_states(encoder: TextTransformer, ids: Tensor, keep: Tensor, layer: ClipSkip) -> Tensor:
    """The `layer` states (N, L, D) of ids (N, L) with the keys where `keep` (N, L) is False hidden from every
    query (transformers' `attention_mask`), on top of the causal mask."""
    n = encoder.config.layers
    layer.check(n)
    position = n + 1 + layer.index
    L = ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
    mask = (causal & keep[:, None, :])[:, None]  # (N, 1, L, L)
    states = encoder.transformer.forward_hidden(encoder.embed(ids), causal=False, attn_mask=mask, stop_at=position)
    return encoder.ln_final(states[position]) if layer.final_norm else states[position]


def _apply(z: Tensor, weights: Tensor, empty: Tensor) -> Tensor:
    """compel's per-token weighting: `empty + (z - empty) * w` where w != 1; untouched where w == 1."""
    if bool((weights == 1).all()):
        return z
    w = weights[:, None].expand(z.shape)
    return torch.where(w == 1, z, empty + (z - empty) * w)


def _mix(stack: Tensor, weights: Sequence[float], normalize: bool) -> Tensor:
    w = torch.tensor(list(weights), dtype=stack.dtype, device=stack.device)
    w = w / w.sum() if normalize else w
    return (stack * w[:, None, None]).sum(dim=0)


def _fragments(prompt: CompelPrompt) -> list[Segment]:
    """The fragments compel encodes: a swap contributes its original words."""
    out: list[Segment] = []
    for item in prompt.fragments:
        out += item.original if isinstance(item, CompelSwap) else [item]
    return out or [Segment("", 1.0)]


def _encode_prompt(encoder: TextTransformer, prompt: CompelPrompt, tokenizer: Tokenizer, pad_id: int,
                   layer: ClipSkip, empty: Tensor) -> Tensor:  # fmt: skip
    """One flattened prompt's conditioning (L, D)."""
    fragments = _fragments(prompt)
    tokens = [tokenizer.encode(f.text)[:CHUNK_LENGTH] for f in fragments]
    flat = [t for ids in tokens for t in ids]
    token_weights = [f.weight for f, ids in zip(fragments, tokens) for _ in ids][:CHUNK_LENGTH]
    framed = _frame(flat, tokenizer, pad_id)
    weights = torch.ones(len(framed))
    weights[1 : len(token_weights) + 1] = torch.tensor(token_weights)
    keeps = [torch.ones(len(framed), dtype=torch.bool)]
    lerp = [1.0]
    start = 1
    for fragment, ids in zip(fragments, tokens):
        if not ids:
            continue
        if start > CHUNK_LENGTH:  # cut off by truncation: compel stops looking
            break
        end = start + len(ids) - 1
        if fragment.weight < 1:
            keep = torch.ones(len(framed), dtype=torch.bool)
            stop = end if end <= CHUNK_LENGTH else CHUNK_LENGTH + 1  # a cut fragment masks the end token too
            keep[start : stop + 1] = False
            keeps.append(keep)
            lerp.append(math.tan((1.0 - max(_MIN_WEIGHT, fragment.weight)) * math.pi / 2))
        start = end + 1
    device = encoder.token_embed.weight.device
    ids = torch.tensor([framed] * len(keeps), device=device)
    z = _masked_states(encoder, ids, torch.stack(keeps).to(device), layer)  # (K, L, D)
    z = torch.stack([_apply(zk, weights.to(z.dtype).to(device), empty) for zk in z])
    return _mix(z, lerp, normalize=True)


def _encode_part(encoder, part, tokenizer, pad_id, layer, empty) -> Tensor:
    if isinstance(part, CompelBlend):
        stack = torch.stack([_encode_prompt(encoder, p, tokenizer, pad_id, layer, empty) for p in part.prompts])
        return _mix(stack, part.weights, part.normalize)
    return _encode_prompt(encoder, part, tokenizer, pad_id, layer, empty)


def encode_compel(encoder: TextTransformer, prompts: Sequence[CompelChunks], tokenizer: Tokenizer, pad_id: int,
                  count: int, layer: ClipSkip, pooled: bool = False) -> TextStates:  # fmt: skip
    """compel's conditioning for prompts read by `CompelChunks`: hidden (B, count * 77, D), each prompt padded
    with the empty prompt's states; pooled (B, E) of each raw prompt text if `pooled`."""
    device = encoder.token_embed.weight.device
    empty_ids = torch.tensor([_frame([], tokenizer, pad_id)], device=device)
    empty = encode_hidden(encoder, empty_ids, layer).hidden[0]  # (L, D)
    empty_conditioning = None
    out = []
    for prompt in prompts:
        blocks = []
        for part, weight in zip(prompt, prompt.conjunction.weights or (1.0,)):
            c = _encode_part(encoder, part, tokenizer, pad_id, layer, empty)
            if weight != 1:
                if empty_conditioning is None:
                    empty_conditioning = _encode_prompt(encoder, _EMPTY, tokenizer, pad_id, layer, empty)
                c = empty_conditioning + (c - empty_conditioning) * weight
            blocks.append(c)
        blocks += [empty] * (count - len(blocks))
        out.append(torch.cat(blocks))  # (count * L, D)
    hidden = torch.stack(out)  # (B, count * L, D)
    if not pooled:
        return TextStates(hidden, None)
    ids = torch.tensor([_frame(tokenizer.encode(p.text), tokenizer, pad_id) for p in prompts], device=device)
    return TextStates(hidden, encode_hidden(encoder, ids, ClipSkip(), pooled=True).pooled)
