"""compel's prompt syntax (`word+`, `(phrase)1.3`, `.blend()`, `.and()`): a parser that reads what compel 2.5 reads.

The rules are those of compel's pyparsing grammar (`compel.prompt_parser`), rewritten as an ordered-choice descent
with no dependency: a `+` multiplies a weight by 1.1, a `-` by 0.9 (`++` is 1.1², ...); `(a b)1.3` and
`a.attend(1.3)` set an explicit factor; nesting multiplies; `("a", "b").blend(0.7, 0.3)` lerps the prompts'
conditionings (normalised unless `no_normalize`); `("a", "b").and()` encodes each part on its own (concatenated
along the sequence); `.swap()` keeps its original words (cross-attention control is not done here);
`withLora(name, w)` / `useLora` is recorded and has no effect. Where compel raises (blend weights that do not match
the prompts, a `.swap()` inside a blend, a stray vertical tab...), the construct reads as plain words instead.
The embedding math is in `compel_encode`.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Union

from .syntax import Segment

PLUS = 1.1
MINUS = 0.9
_WS = " \t\n\r"
_WORD = re.compile(r"""(?:\\[()",.+\-=]|[+\-](?=[^ \t\n\r()",.+\-=])|[^ \t\n\r\x0b\x0c()",.+\-=])+""")
_REAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_INT = re.compile(r"-?[0-9]+")
_KEYWORD = re.compile(r"[A-Za-z0-9_\-]+")
_QUOTED = re.compile(r'"(?:(?:\\")|(?:[^"\n\r]))*"')
_FREE = re.compile(r"[^ \t\n\r\x0b\x0c]+")
_SPACE = re.compile(r"[ \t\n\r]+")
_SWAP_DEFAULTS = {"s_start": 0.0, "s_end": 0.0, "t_start": 0.2, "t_end": 1.0}


class CompelSwap(NamedTuple):
    """`original.swap(edited, options)`: prompt-to-prompt editing; only `original` is encoded here."""

    original: tuple[Segment, ...]
    edited: tuple[Segment, ...]
    options: tuple[tuple[str, object], ...]


class CompelPrompt(NamedTuple):
    """One flattened prompt: weighted text fragments (adjacent equal weights joined by a space) and swaps."""

    fragments: tuple[Union[Segment, CompelSwap], ...]


class CompelBlend(NamedTuple):
    """`(...).blend(w...)`: the weighted sum of the prompts' conditionings (weights divided by their sum if
    `normalize`)."""

    prompts: tuple[CompelPrompt, ...]
    weights: tuple[float, ...]
    normalize: bool = True


class CompelConjunction(NamedTuple):
    """A whole prompt: its parts (each encoded on its own, then concatenated along the sequence), each part's
    weight (a lerp from the empty prompt's conditioning), and the `withLora` requests (name, weight)."""

    parts: tuple[Union[CompelPrompt, CompelBlend], ...]
    weights: tuple[float, ...]
    loras: tuple[tuple[str, float], ...] = ()


class _Fail(Exception):
    """No match here (pyparsing's ParseException): the caller tries its next alternative."""


class _Attention(NamedTuple):
    weight: float
    children: list


class _Lora(NamedTuple):
    name: str
    weight: float


class _Swap(NamedTuple):
    original: list
    edited: list
    options: dict


class _Blend(NamedTuple):
    prompts: list  # each a list of parsed items
    weights: list
    normalize: bool


class _Conj(NamedTuple):
    parts: list  # parsed item lists or _Blend
    weights: list


def _fragment(text: str, weight: float = 1.0) -> Segment:
    """compel's Fragment: `\\(`, `\\)` and `\\"` become the plain character each time one is built."""
    return Segment(text.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"'), float(weight))


class _Parser:
    """The grammar of `compel.prompt_parser.build_parser_syntax`; each method takes a position and returns
    (position, items) or raises `_Fail`. Tokens skip leading spaces, tabs and newlines, as pyparsing's do."""

    def __init__(self, text: str):
        self.s = text

    def skip(self, pos: int) -> int:
        while pos < len(self.s) and self.s[pos] in _WS:
            pos += 1
        return pos

    def lit(self, pos: int, *texts: str) -> tuple[int, str]:
        pos = self.skip(pos)
        for text in texts:
            if self.s.startswith(text, pos):
                return pos + len(text), text
        raise _Fail

    def regex(self, pos: int, pattern: re.Pattern, skip: bool = True) -> tuple[int, str]:
        m = pattern.match(self.s, self.skip(pos) if skip else pos)
        if not m:
            raise _Fail
        return m.end(), m.group(0)

    def first(self, pos: int, *alternatives) -> tuple[int, list]:
        for alternative in alternatives:
            try:
                return alternative(pos)
            except _Fail:
                pass
        raise _Fail

    def many(self, pos: int, *alternatives) -> tuple[int, list]:
        items: list = []
        while True:
            try:
                pos, got = self.first(pos, *alternatives)
            except _Fail:
                return pos, items
            items.extend(got)

    def number(self, pos: int) -> tuple[int, float]:
        try:
            pos, text = self.regex(pos, _REAL)
        except _Fail:
            pos, text = self.regex(pos, _INT)
        return pos, float(text)

    def word(self, pos: int) -> tuple[int, list]:
        pos, text = self.regex(pos, _WORD)
        return pos, [_fragment(text)]

    def quoted(self, pos: int, inner: str = "including") -> tuple[int, list]:
        pos, text = self.regex(pos, _QUOTED)
        content = text[1:-1].replace('\\"', '"')
        if not content.strip():
            return pos, [_fragment("")]
        sub = _Parser(content.replace('"', '\\"'))
        end, items = sub.prompt(0) if inner == "prompt" else sub.fragments(0, True)
        if sub.skip(end) != len(sub.s):
            raise _Fail
        return pos, items

    def paren(self, pos: int) -> tuple[int, list]:
        pos, _ = self.lit(pos, "(")
        pos, items = self.fragments(pos, True)
        pos, _ = self.lit(pos, ")")
        return pos, items

    def fragments(self, pos: int, commas: bool) -> tuple[int, list]:
        alternatives = [self.lora, self.attention, self.swap, self.paren, self.quoted, self.word]
        if commas:
            alternatives.append(self.punctuation)
        return self.many(pos, *alternatives)

    def punctuation(self, pos: int) -> tuple[int, list]:
        pos, text = self.lit(pos, ",", ".")
        return pos, [_fragment(text)]

    def target(self, pos: int) -> tuple[int, list]:
        return self.first(pos, self.quoted, self.paren, self.word)

    def not_white(self, pos: int) -> None:
        if pos < len(self.s) and self.s[pos] in _WS:
            raise _Fail

    def operator(self, pos: int, numbers: bool = True) -> tuple[int, float]:
        pos = self.skip(pos)
        for sign, base in (("+", PLUS), ("-", MINUS)):
            run = len(self.s[pos:]) - len(self.s[pos:].lstrip(sign))
            if run:
                return pos + run, pow(base, run)
        if not numbers:
            raise _Fail
        return self.number(pos)

    def attention(self, pos: int) -> tuple[int, list]:
        try:  # target.attend(weight)
            end, children = self.target(pos)
            end, _ = self.lit(end, ".attend")
            end, _ = self.lit(end, "(")
            end, weight = self.operator(end)
            end, _ = self.lit(end, ")")
            return end, [_Attention(weight, children)]
        except _Fail:
            pass
        try:  # "quoted"1.2 / (paren)++: no space before the weight
            end, children = self.first(pos, self.quoted, self.paren)
            self.not_white(end)
            end, weight = self.operator(end)
            return end, [_Attention(weight, children)]
        except _Fail:
            end, children = self.word(pos)
            self.not_white(end)
            end, weight = self.operator(end, numbers=False)
            return end, [_Attention(weight, children)]

    def swap(self, pos: int) -> tuple[int, list]:
        pos, original = self.target(pos)
        pos, _ = self.lit(pos, ".swap")
        pos, _ = self.lit(pos, "(")
        pos, edited = self.fragments(pos, False)
        options: list = []
        try:
            end, _ = self.lit(pos, ",")
            pos, options = self.options(end)
        except _Fail:
            pass
        pos, _ = self.lit(pos, ")")
        return pos, [_Swap(original, edited, _swap_options(options))]

    def lora(self, pos: int) -> tuple[int, list]:
        pos, _ = self.lit(pos, "useLora", "withLora")
        pos, _ = self.lit(pos, "(")
        pos, name = self.regex(pos, _KEYWORD)
        weight = 1.0
        try:
            end, _ = self.lit(pos, ",")
            pos, weight = self.number(end)
        except _Fail:
            pass
        pos, _ = self.lit(pos, ")")
        return pos, [_Lora(name, weight)]

    def option(self, pos: int) -> tuple[int, list]:
        try:
            end, key = self.regex(pos, _KEYWORD)
            end, _ = self.lit(end, "=")
            try:
                end, value = self.number(end)
            except _Fail:
                end, value = self.regex(end, _KEYWORD)
            return end, [key, value]
        except _Fail:
            pass
        try:
            end, value = self.number(pos)
            return end, [str(value)]
        except _Fail:
            end, key = self.regex(pos, _KEYWORD)
            return end, [key]

    def options(self, pos: int) -> tuple[int, list]:
        """pyparsing's `Dict(Optional(DelimitedList(option)))`: a list of [key] / [key, value] groups."""
        try:
            pos, first = self.option(pos)
        except _Fail:
            return pos, []
        groups = [first]
        while True:
            try:
                end, _ = self.lit(pos, ",")
                pos, group = self.option(end)
            except _Fail:
                return pos, groups
            groups.append(group)

    def prompt(self, pos: int) -> tuple[int, list]:
        free = lambda p: (self.regex(p, _FREE, skip=False)[0], [_fragment(self.regex(p, _FREE, skip=False)[1])])
        space = lambda p: (self.regex(p, _SPACE, skip=False)[0], [])
        return self.many(pos, self.swap, self.lora, self.attention, self.quoted, self.paren, free, space)

    def operands(self, pos: int, operators: tuple[str, ...]) -> tuple[int, list, str, list]:
        """`(target, target, ...).operator(options)`, shared by `.blend` and `.and` / `.add`."""
        pos, _ = self.lit(pos, "(")
        targets = []
        while True:
            pos, items = self.first(pos, self.target, lambda p: self.quoted(p, "prompt"))
            targets.append(items)
            try:
                pos, _ = self.lit(pos, ",")
            except _Fail:
                break
        pos, _ = self.lit(pos, ")")
        pos, operator = self.lit(pos, *operators)
        pos, _ = self.lit(pos, "(")
        pos, options = self.options(pos)
        pos, _ = self.lit(pos, ")")
        return pos, targets, operator, options

    def blend(self, pos: int) -> tuple[int, list]:
        pos, targets, _, options = self.operands(pos, (".blend",))
        normalize = not (options and options[-1][0] == "no_normalize")
        weights = _floats(options if normalize else options[:-1])
        prompts = [_prompt(t)[0] for t in targets]
        empty_or_swap = any(p is None or _has_swap(t) for p, t in zip(prompts, targets))
        if (weights and len(weights) != len(targets)) or empty_or_swap:
            raise _Fail  # compel raises here; the text reads as words instead
        return pos, [_Blend(targets, weights or [1.0] * len(targets), normalize)]

    def conjunction(self) -> _Conj:
        """compel's `explicit_conjunction | implicit_conjunction` (text after an explicit one is ignored)."""
        try:
            _, targets, _, options = self.operands(0, (".and", ".add"))
            weights = _floats(options)
            if not weights or len(weights) == len(targets):
                return _Conj(targets, weights or [1.0] * len(targets))
        except _Fail:
            pass
        pos, loras = self.many(0, self.lora)
        try:
            end, body = self.blend(pos)
            end, more = self.many(end, self.lora)
            if self.skip(end) == len(self.s):
                return _Conj([loras, *body, more], [1.0] * 3)
        except _Fail:
            pass
        pos, body = self.prompt(pos)
        if pos != len(self.s):  # a vertical tab or form feed, which compel cannot read: the words around it are text
            body += [_fragment(w) for w in self.s[pos:].split()]
        return _Conj([loras, body], [1.0] * 2)


def _floats(options: list) -> list[float]:
    try:
        return [float(group[0]) for group in options]
    except ValueError:
        raise _Fail from None


def _has_swap(items: list) -> bool:
    return any(isinstance(x, _Swap) or (isinstance(x, _Attention) and _has_swap(x.children)) for x in items)


def _swap_options(groups: list) -> dict:
    """compel's CrossAttentionControlSubstitute options: the defaults, updated; `shape_freedom` sets `s_end`."""
    given = {group[0]: group[1] if len(group) == 2 else "" for group in groups}
    options = dict(_SWAP_DEFAULTS)
    freedom = given.pop("shape_freedom", None)
    if freedom is not None:
        if not isinstance(freedom, float):
            raise _Fail
        options["s_end"] = 1.0 - freedom ** (1.0 / 3.0)
    options.update(given)
    return options


def _flatten(items: list, scale: float = 1.0) -> tuple[list, list]:
    """compel's `flatten_internal` over parsed items: (fragments and swaps, loras), weights multiplied down."""
    out: list = []
    loras: list = []
    for item in items:
        if isinstance(item, _Attention):
            got, more = _flatten(item.children, scale * item.weight)
            out += got
            loras += more
        elif isinstance(item, _Lora):
            loras.append((item.name, item.weight))
        elif isinstance(item, Segment):
            out.append(_fragment(item.text, item.weight * scale))
        else:  # _Swap
            original, more = _flatten(item.original, scale)
            edited, more_edited = _flatten(item.edited, scale)
            out.append(_Swap(original or [_fragment("")], edited or [_fragment("")], item.options))
            loras += more + more_edited
    return out, loras


def _fuse(items: list) -> list:
    """Join each fragment to the one before it, with a space, when their weights are equal (swaps stay apart)."""
    fused: list = []
    for item in items:
        if isinstance(item, _Swap):
            fused.append(CompelSwap(tuple(_fuse(item.original)), tuple(_fuse(item.edited)),
                                    tuple(sorted(item.options.items()))))  # fmt: skip
        elif fused and isinstance(fused[-1], Segment) and fused[-1].weight == item.weight:
            fused[-1] = _fragment(fused[-1].text + " " + item.text, fused[-1].weight)
        else:
            fused.append(item)
    return fused


def _prompt(items: list) -> tuple[CompelPrompt | None, list]:
    flat, loras = _flatten(items)
    fused = _fuse(flat)
    return (CompelPrompt(tuple(fused)) if fused else None), loras


def parse_compel(prompt: str) -> CompelConjunction:
    """Parse a prompt in compel's syntax (the structure of compel's `PromptParser().parse_conjunction`).

    A prompt with no text (only `withLora`, say) has no parts; the empty prompt is one empty fragment.

    Raises:
        ValueError: `prompt` is not a str.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    prompt = re.sub(r",(\S)", r", \1", prompt)  # compel puts a space after every comma first
    if not prompt.strip():
        return CompelConjunction((CompelPrompt((Segment("", 1.0),)),), (1.0,))
    root = _Parser(prompt).conjunction()
    parts, weights, loras = [], [], []
    for part, weight in zip(root.parts, root.weights):
        if isinstance(part, _Blend):
            prompts = [_prompt(p) for p in part.prompts]
            loras += [lora for _, more in prompts for lora in more]
            parts.append(CompelBlend(tuple(p for p, _ in prompts), tuple(part.weights), part.normalize))
        else:
            flat, more = _prompt(part)
            loras += more
            if flat is None:
                continue
            parts.append(flat)
        weights.append(weight)
    return CompelConjunction(tuple(parts), tuple(weights), tuple(loras))
