"""AUTOMATIC1111's prompt editing, alternation and `AND`: which text a prompt reads at each sampling step.

Syntax (A1111's `prompt_parser`, whose outputs the tests compare with this module's on hundreds of prompts):

- `[a:b:N]` reads `a` up to step N and `b` after it; `[a:N]` adds `a` after step N; `[a::N]` removes `a` after
  step N. N with a decimal point is a fraction of the steps (`0.25`), without one an absolute step (`5`); with
  `hires_steps` the schedule covers the high-resolution pass: `1.5` is half-way through it, `15` its 5th step
  after 10 base steps.
- `[a|b|c]` alternates every step (a, b, c, a, ...); an option may be empty (`[fe|]male`).
- All of them nest, and sit inside weights (`(a:1.2)`, `[a]`), whose text is passed on unchanged.
- `\\x` escapes any character. `a AND b:0.7` composes sub-prompts with weights (composable diffusion).

Malformed input never raises; it reads literally, as A1111 reads it: brackets that do not form one of the shapes
above stay text, and a prompt that cannot be read at all (a `|` outside an alternation, a trailing backslash)
is the whole prompt as text, with no schedule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, Union

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # text inside brackets: no bracket, colon or bar unless escaped
_NUMBER = re.compile(r"[+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+)")  # lark's SIGNED_NUMBER
_SPACE = re.compile(r"\s*")
_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"(?P<text>.*?)(?:\s*:\s*(?P<weight>[+-]?(?:\d+\.?|\d*\.\d+)))?\s*", re.S)


class Edit(NamedTuple):
    """`[before:after:number]`; `before` is None for `[after:number]`."""

    before: list | None
    after: list
    number: str


class Alternate(NamedTuple):
    """`[a|b|...]`: one option per step, in turn."""

    options: list


Node = Union[str, Edit, Alternate]  # noqa: UP007 (a runtime alias)


def _group(s: str, i: int) -> tuple[list[Node], int] | None:
    """The bracketed structure opening at s[i] (`(`/`[`): its nodes and the index after it; None if malformed."""
    parts, delims, spans, j = [], [], [], i + 1
    while True:
        part = _sequence(s, j)
        if part is None:
            return None
        nodes, end = part
        parts.append(nodes)
        spans.append((j, end))
        if end >= len(s):
            return None
        if s[end] in ":|":
            delims.append(s[end])
            j = end + 1
            continue
        break
    close = s[end]
    if s[i] == "(":
        if close != ")" or len(parts) > 2 or "|" in delims:
            return None
        return ["(", *parts[0], *([":", *parts[1]] if len(parts) == 2 else []), ")"], end + 1
    if close != "]" or ("|" in delims and ":" in delims):
        return None
    if not delims:
        return ["[", *parts[0], "]"], end + 1
    if "|" in delims:
        return [Alternate(parts)], end + 1
    number = _number(s[slice(*spans[-1])])
    if number is None or len(parts) > 3:
        return None
    before = parts[0] if len(parts) == 3 else None
    return [Edit(before, parts[-2], number)], end + 1


def _number(text: str) -> str | None:
    """The number of `[ws] NUMBER [ws]`, matched as lark's dynamic lexer does (longest match, then the rest)."""
    start = _SPACE.match(text).end()
    m = _NUMBER.match(text, start)
    if m is None or _SPACE.fullmatch(text, m.end()) is None:
        return None
    return m.group(0)


def _sequence(s: str, i: int) -> tuple[list[Node], int] | None:
    """Text and nested structures from s[i] up to the next `:`, `|` or closing bracket at this depth (or the end)."""
    nodes: list[Node] = []
    while i < len(s) and s[i] not in ":|)]":
        if s[i] in "([":
            group = _group(s, i)
            if group is None:
                return None
            nodes += group[0]
            i = group[1]
            continue
        m = _PLAIN.match(s, i)
        if m is None:  # a backslash at the end, or before a newline
            return None
        nodes.append(m.group(0))
        i = m.end()
    return nodes, i


def _top_items(prompt: str) -> tuple[list[int | None], list[tuple[int, int, str]]]:
    """Where each top-level structure starting at i ends (or None), and the one-character-or-escape text items."""
    n = len(prompt)
    groups: list[int | None] = [None] * n
    units = []  # (start, end, kind): kind "text", "bracket" (may be text) or "bad" (cannot be read)
    for i in range(n):
        if prompt[i] in "([":
            group = _group(prompt, i)
            groups[i] = None if group is None else group[1]
    i = 0
    while i < n:
        c = prompt[i]
        if c == "\\":
            bad = i + 1 >= n or prompt[i + 1] == "\n"
            units.append((i, i + 1 if bad else i + 2, "bad" if bad else "text"))
        else:
            units.append((i, i + 1, "bracket" if c in "[]():" else "bad" if c == "|" else "text"))
        i = units[-1][1]
    return groups, units


def parse_schedule(prompt: str) -> list[Node] | None:
    """The prompt's edits and alternations as nodes, or None where A1111's parser rejects it (read literally).

    At the top level a bracket or colon may also be text. Where both readings work, this picks the one A1111's
    Earley parser (lark) picks: the structure, except before a run of an even number (2 or more) of literal
    brackets and colons, where lark's ambiguity resolution reads the structure's own closing bracket as text too.
    """
    n = len(prompt)
    groups, units = _top_items(prompt)
    unit_at = {start: (end, kind) for start, end, kind in units}
    reach, whole = [False] * (n + 1), [False] * (n + 1)  # prefix derivable; derivable as one prompt (no text runs)
    reach[0] = whole[0] = True
    closers: dict[int, list[int]] = {}
    for i in range(n):
        if i in unit_at and (reach[i] or whole[i]):
            end, kind = unit_at[i]
            if kind != "bad":
                reach[end] = reach[end] or reach[i]
                whole[end] = whole[end] or (whole[i] and kind == "text")
            if groups[i] is not None:
                reach[groups[i]] = reach[groups[i]] or reach[i]
                whole[groups[i]] = whole[groups[i]] or whole[i]
                closers.setdefault(groups[i], []).append(i)
    if not reach[n]:
        return None
    return _resolve(prompt, unit_at, closers, reach, whole)


def _resolve(prompt: str, unit_at: dict, closers: dict, reach: list[bool], whole: list[bool]) -> list[Node]:
    """Walk back from the end choosing the last item as lark's resolution does (see `parse_schedule`)."""
    ends = {end: (start, kind) for start, (end, kind) in unit_at.items()}
    out: list[Node] = []
    k = len(prompt)
    while k > 0:
        if whole[k]:  # the whole prefix is one prompt
            return _sequence(prompt[:k], 0)[0] + out[::-1]
        if all(c in "[]():" for c in prompt[:k]):  # the whole prefix is one run of text brackets
            return [prompt[:k]] + out[::-1]
        start, kind = ends[k]
        opener = next((i for i in closers.get(k, []) if reach[i]), None)
        if kind == "text" or opener is not None:
            out += [prompt[start:k]] if opener is None else _group(prompt, opener)[0][::-1]
            k = start if opener is None else opener
            continue
        j = k - 1  # a run of text brackets ends at k: lark prefers its longest odd length, then the longest even
        while j > 0 and unit_at.get(j - 1, (0, ""))[1] == "bracket":
            j -= 1
        starts = range(j, k)
        order = [i for i in starts if (k - i) % 2] + [i for i in starts if not (k - i) % 2]
        i = next(i for i in order if reach[i])
        out.append(prompt[i:k])
        k = i
    return out[::-1]



def _when(number: str, steps: int, base_steps: int, hires: bool) -> int:
    """The last step of `before`: a fraction of the steps (a decimal point) or an absolute step, as A1111 counts."""
    value = float(number)
    if "." in number:
        value = (value - (1.0 if hires else 0.0)) * steps
    else:
        value -= base_steps if hires else 0
    if not math.isfinite(value):  # 1e999: A1111 fails here; read it as "never" / "always"
        return steps if value > 0 else 0
    return min(steps, int(value))


def _boundaries(nodes: list[Node], steps: int, when: Callable[[str], int], out: set[int]) -> None:
    for node in nodes:
        if isinstance(node, Edit):
            if when(node.number) >= 1:
                out.add(when(node.number))
            _boundaries((node.before or []) + node.after, steps, when, out)
        elif isinstance(node, Alternate):
            out.update(range(1, steps + 1))
            for option in node.options:
                _boundaries(option, steps, when, out)


def _text(nodes: list[Node], step: int, when: Callable[[str], int]) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Edit):
            out.append(_text((node.before or []) if step <= when(node.number) else node.after, step, when))
        else:
            out.append(_text(node.options[(step - 1) % len(node.options)], step, when))
    return "".join(out)


def _check_steps(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """The texts a prompt reads over the sampling steps, as A1111's `get_learned_conditioning_prompt_schedules`.

    Args:
        prompt: the prompt (without `AND`; see `split_and`).
        steps: the sampling steps (the base pass).
        hires_steps: the steps of a high-resolution pass: then the schedule covers that pass, with fractions
            counted from 1.0 and absolute steps from `steps` (A1111's default since 1.6).

    Returns:
        `[(end_step, text), ...]` in order: each text holds up to and including its end step; the last ends at
        `steps` (or `hires_steps`).

    Raises:
        ValueError: `prompt` is not a str, or a step count is not a positive int.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    _check_steps(steps, "steps")
    if hires_steps is not None:
        _check_steps(hires_steps, "hires_steps")
    total = steps if hires_steps is None else hires_steps
    nodes = parse_schedule(prompt)
    if nodes is None:
        return [(total, prompt)]
    cache: dict[str, int] = {}

    def when(number: str) -> int:
        if number not in cache:
            cache[number] = _when(number, total, steps, hires_steps is not None)
        return cache[number]

    ends = {total}
    _boundaries(nodes, total, when, ends)
    return [(end, _text(nodes, end, when)) for end in sorted(ends)]


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable diffusion's sub-prompts: `a AND b:0.7` is `[("a", 1.0), (" b", 0.7)]`, as A1111 splits it.

    `AND` (upper case, a word on its own) separates sub-prompts anywhere, brackets included; a sub-prompt ending in
    `:number` takes that weight (negative too). Trailing space is dropped, leading space kept, as in A1111.

    Raises:
        ValueError: `prompt` is not a str.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    parts = []
    for part in _AND.split(prompt):
        m = _AND_WEIGHT.fullmatch(part)
        parts.append((m.group("text"), 1.0 if m.group("weight") is None else float(m.group("weight"))))
    return parts


class Weighted(NamedTuple):
    """One `AND` sub-prompt's conditioning at a step, and its weight."""

    conditioning: Any
    weight: float


class ScheduledConditioning:
    """A prompt's conditioning step by step, each distinct text encoded once.

    ```python
    sd15 = StableDiffusionText(encoder)
    cond = ScheduledConditioning(lambda text: sd15(text, "blurry"), "a [cat:dog:0.5] AND snow:0.5", steps=20)
    for step in range(20):                      # A1111's samplers count from 0
        parts = cond.at(step)                   # [Weighted(Conditioning, 1.0), Weighted(Conditioning, 0.5)]
    ```

    Args:
        encoder: called with one text, returns its conditioning (e.g. a `StableDiffusionText` or `SDXLText`).
        prompt: the prompt, with edits, alternations and `AND`.
        steps: the sampling steps; `hires_steps` as in `prompt_schedule`.
        cache: text -> conditioning, to share encodings between several prompts with the same encoder.
    """

    def __init__(self, encoder: Callable[[str], Any], prompt: str, steps: int, hires_steps: int | None = None,
                 cache: dict[Hashable, Any] | None = None):  # fmt: skip
        if not callable(encoder):
            raise ValueError(f"encoder must be callable (text -> conditioning), got {type(encoder).__name__}")
        self.encoder = encoder
        self.steps = steps if hires_steps is None else hires_steps
        self.parts = [(prompt_schedule(text, steps, hires_steps), w) for text, w in split_and(prompt)]
        self.cache = {} if cache is None else cache

    def texts_at(self, step: int) -> list[tuple[str, float]]:
        """Each sub-prompt's text at `step` and its weight: the first schedule entry ending at or after `step`.

        This is A1111's lookup (`reconstruct_cond_batch`); its samplers pass the 0-based step, so steps 0 and 1
        read the same text. Steps run from 0 to `steps` (`hires_steps` with a high-resolution pass).

        Raises:
            ValueError: `step` is outside 0..steps.
        """
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.steps:
            raise ValueError(f"step must be an int in 0..{self.steps}, got {step!r}")
        return [(next(text for end, text in schedule if step <= end), w) for schedule, w in self.parts]

    def at(self, step: int) -> list[Weighted]:
        """The conditioning of each sub-prompt at `step` (see `texts_at`), with its weight."""
        out = []
        for text, weight in self.texts_at(step):
            if text not in self.cache:
                self.cache[text] = self.encoder(text)
            out.append(Weighted(self.cache[text], weight))
        return out
