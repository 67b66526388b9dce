"""Which text-tower layer a diffusion model is conditioned on ("CLIP skip"), with each convention named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..models.text import TextTransformer


def _count(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class ClipSkip:
    """One hidden state of the text tower, and whether the final LayerNorm is applied to it.

    `hidden_states` are transformers' (the embeddings, then each block's output: layers + 1 tensors), so
    `index=-1` is the last block's output. Build one with the constructor of the convention you are reading:

    | convention | setting | state | final LayerNorm |
    |---|---|---|---|
    | AUTOMATIC1111 "CLIP skip" | `N >= 1` | `hidden_states[-N]` | yes |
    | diffusers SD 1.x `clip_skip` | `k >= 0` or None | `hidden_states[-(k+1)]` | yes |
    | diffusers SDXL `clip_skip` | `k >= 0` or None | `hidden_states[-(k+2)]` | no |

    so `a1111(N) == diffusers(N - 1)`, `a1111(1) == diffusers(None)`, and `sdxl(k)` is A1111's `k + 2`
    without the LayerNorm.

    Attributes:
        index: negative index into `hidden_states`.
        final_norm: apply the tower's final LayerNorm (`ln_final`) to the chosen state.
    """

    index: int = -1
    final_norm: bool = True

    def __post_init__(self):
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index >= 0:
            raise ValueError(f"index must be a negative int (counted from the last hidden state), got {self.index!r}")

    @classmethod
    def a1111(cls, n: int = 1) -> ClipSkip:
        """AUTOMATIC1111's "CLIP skip" N: `hidden_states[-N]`, then the final LayerNorm (1 = the last layer)."""
        return cls(-_count(n, "A1111 CLIP skip", 1), True)

    @classmethod
    def diffusers(cls, k: int | None = None) -> ClipSkip:
        """diffusers' SD 1.x `clip_skip=k`: `hidden_states[-(k + 1)]`, then the final LayerNorm (None = 0)."""
        return cls(-(_count(0 if k is None else k, "clip_skip", 0) + 1), True)

    @classmethod
    def sdxl(cls, k: int | None = None) -> ClipSkip:
        """diffusers' SDXL `clip_skip=k`: `hidden_states[-(k + 2)]`, no final LayerNorm (None = 0: penultimate)."""
        return cls(-(_count(0 if k is None else k, "clip_skip", 0) + 2), False)

    def check(self, layers: int) -> None:
        """Raise if a tower with `layers` blocks (layers + 1 hidden states) has no such state."""
        if -self.index > layers + 1:
            raise ValueError(
                f"hidden_states[{self.index}] does not exist: a {layers}-layer text tower has {layers + 1} hidden "
                f"states (index -1 to -{layers + 1})"
            )


class TextStates(NamedTuple):
    """A text tower's conditioning for one batch.

    Attributes:
        hidden: the chosen hidden state, (B, L, D).
        pooled: the projected feature at the end token, (B, E); None when it was not asked for.
    """

    hidden: Tensor
    pooled: Tensor | None


def _embed(encoder: TextTransformer, tokens: Tensor, extra: Tensor) -> Tensor:
    """`encoder.embed(tokens)` where ids from the vocabulary size on read rows of `extra` (textual inversion)."""
    vocab = encoder.token_embed.num_embeddings
    new = tokens >= vocab  # (B, L)
    x = encoder.embed(tokens.masked_fill(new, 0))  # (B, L, D)
    if bool(new.any()):
        if int(tokens.max()) >= vocab + extra.shape[0]:
            raise ValueError(f"token id {int(tokens.max())} is past the {extra.shape[0]} extra vectors")
        b, l = new.nonzero(as_tuple=True)
        x[b, l] = extra.to(x)[tokens[b, l] - vocab] + encoder.pos_embed[l]  # the sum embed makes for a token
    return x


def encode_hidden(
    encoder: TextTransformer, tokens: Tensor, layer: ClipSkip, pooled: bool = False, extra: Tensor | None = None
) -> TextStates:
    """The hidden state `layer` names for token ids (B, L), and the pooled feature if `pooled`.

    `extra` (X, D) are vectors for the ids past the tower's vocabulary (textual inversion, see `TextualInversion`):
    id `vocab_size + i` reads `extra[i]`; pooling ignores those ids (the end token is found as without them).

    Blocks past the chosen state run only when the pooled feature (which reads the last one) is asked for. They
    run in full: `Block.forward_one` at the pooling position alone would save most of the last block, but its
    result differs from transformers' in the last bit, and the pooled output is kept bit-identical instead.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (B, L) ids, got shape {tuple(tokens.shape)}")
    n, causal = encoder.config.layers, encoder.config.causal
    layer.check(n)
    position = n + 1 + layer.index  # blocks run to produce the chosen state
    if extra is not None:
        x = _embed(encoder, tokens, extra)
        tokens = tokens.masked_fill(tokens >= encoder.token_embed.num_embeddings, 0)  # for `pool_index`
    else:
        x = encoder.embed(tokens)
    states = encoder.transformer.forward_hidden(x, causal=causal, stop_at=n if pooled else position)
    hidden = encoder.ln_final(states[position]) if layer.final_norm else states[position]  # (B, L, D)
    if not pooled:
        return TextStates(hidden, None)
    last = hidden if layer.final_norm and position == n else encoder.ln_final(states[n])
    end = last[torch.arange(tokens.shape[0], device=tokens.device), encoder.pool_index(tokens)]  # (B, D)
    return TextStates(hidden, encoder.proj(end))  # pooled (B, E)


def encode_prompt(encoder: TextTransformer, tokens: Tensor, layer: ClipSkip | None = None) -> Tensor:
    """The conditioning hidden states (B, L, D) for token ids (B, L); `layer` defaults to the last layer with the
    final LayerNorm (transformers' `last_hidden_state`, SD 1.x's default)."""
    return encode_hidden(encoder, tokens, layer or ClipSkip()).hidden
