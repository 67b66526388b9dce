"""Declarative key maps between foreign checkpoint layouts and ours: pure dict-to-dict conversion."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor


def _identity(t: Tensor) -> Tensor:
    return t


def transpose(t: Tensor) -> Tensor:
    return t.t().contiguous()


@dataclass(frozen=True)
class Rule:
    """One tensor's name in our layout and theirs; `{i}` stands for a layer index in both.

    `to_ours` and `to_theirs` reshape the tensor on the way (they must be inverses).
    """

    ours: str
    theirs: str
    to_ours: Callable[[Tensor], Tensor] = _identity
    to_theirs: Callable[[Tensor], Tensor] = _identity


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


class KeyMap:
    """A set of rules applied in either direction; keys no rule matches are reported, never dropped silently."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = tuple(rules)
        self._theirs = [(_pattern(r.theirs), r) for r in self.rules]
        self._ours = [(_pattern(r.ours), r) for r in self.rules]

    def to_ours(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._convert(sd, self._theirs, lambda r: (r.ours, r.to_ours))

    def to_theirs(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._convert(sd, self._ours, lambda r: (r.theirs, r.to_theirs))

    @staticmethod
    def _convert(sd, patterns, target) -> dict[str, Tensor]:
        out, unknown = {}, []
        for key, value in sd.items():
            for pattern, rule in patterns:
                m = pattern.match(key)
                if m:
                    name, fn = target(rule)
                    out[name.replace("{i}", m.group("i")) if "{i}" in name else name] = fn(value)
                    break
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"unexpected keys: no conversion rule for {len(unknown)} key(s): {sorted(unknown)[:20]}")
        return out


def block_rules(theirs_prefix: str, ours_prefix: str, pairs: Iterable[tuple[str, str]]) -> list[Rule]:
    """Rules for a stack of transformer blocks, from (their suffix, our suffix) pairs."""
    return [Rule(f"{ours_prefix}.{{i}}.{o}", f"{theirs_prefix}.{{i}}.{t}") for t, o in pairs]
