"""AUTOMATIC1111's prompt syntax: attention weights in brackets and the `BREAK` keyword.

Rules (those of A1111's `parse_prompt_attention`, with the differences listed below):

- `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies it by
  1.3; nesting multiplies (`((a))` is 1.21, `[(a:2)]` is 2 / 1.1).
- `\\(`, `\\)`, `\\[`, `\\]`, `\\:` and `\\\\` are the literal characters.
- `BREAK` (upper case, a word on its own) ends the current 75-token chunk.
- Malformed input never raises; it has this literal reading: a `)` or `]` with no open bracket of its kind is
  text; a bracket still open at the end applies to everything after it (as if closed at the end); a `:` not
  followed by a number and `)` is text, and so is a malformed number (`(a:1.2.3)` is `a:1.2.3` at 1.1);
  `[a:2]` is text `a:2` at 1 / 1.1 (only round brackets take a number).

Differences from A1111: `BREAK` splits the chunk inside brackets too (A1111 then reads it as the word "BREAK"
with a weight), a negative weight cannot be mistaken for `BREAK`, a lone backslash is kept as text (A1111
drops it), and a malformed number is text instead of an exception.
"""

from __future__ import annotations

import re
from typing import NamedTuple

ROUND = 1.1
SQUARE = 1 / 1.1

_TOKENS = re.compile(
    r"""
    \\[()\[\]:\\]                                   # escaped character
    | \(                                            # open round
    | \[                                            # open square
    | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\) # ':1.3)' closes a round bracket with a weight
    | \)                                            # close round
    | \]                                            # close square
    | [^\\()\[\]:]+                                 # plain text
    | [:\\]                                         # a lone ':' or backslash: text
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


class Segment(NamedTuple):
    """A run of prompt text with one attention weight; `is_break` marks a `BREAK` (text empty, weight 1)."""

    text: str
    weight: float
    is_break: bool = False


BREAK = Segment("", 1.0, True)


def parse_prompt(prompt: str) -> list[Segment]:
    """Split a prompt into segments of text with their weights, and `BREAK` markers.

    Adjacent segments of equal weight are merged; a prompt with no text gives `[Segment("", 1.0)]`.

    Raises:
        ValueError: `prompt` is not a str.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    out: list[list] = []  # [text, weight, is_break], mutable while brackets close
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            if not item[2]:
                item[1] *= factor

    for m in _TOKENS.finditer(prompt):
        text, weight = m.group(0), m.group("weight")
        if text in opened:
            opened[text].append(len(out))
        elif weight is not None and opened["("]:
            scale(opened["("].pop(), float(weight))
        elif text == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif text == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE)
        elif len(text) == 2 and text[0] == "\\":
            out.append([text[1], 1.0, False])
        else:  # plain text, or an unmatched closer / weight read literally
            for i, part in enumerate(_BREAK.split(text)):
                if i:
                    out.append(["", 1.0, True])
                out.append([part, 1.0, False])
    for start in opened["("]:
        scale(start, ROUND)
    for start in opened["["]:
        scale(start, SQUARE)
    return _merge(out)


def _merge(items: list[list]) -> list[Segment]:
    merged: list[Segment] = []
    for text, weight, is_break in items:
        if is_break:
            merged.append(BREAK)
        elif not text:
            continue
        elif merged and not merged[-1].is_break and merged[-1].weight == weight:
            merged[-1] = Segment(merged[-1].text + text, weight)
        else:
            merged.append(Segment(text, weight))
    return merged or [Segment("", 1.0)]


def plain_prompt(prompt: str) -> list[Segment]:
    """The whole prompt as one segment of weight 1: brackets and `BREAK` are ordinary text (diffusers' reading)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    return [Segment(prompt, 1.0)]
