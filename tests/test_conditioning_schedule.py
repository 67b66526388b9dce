"""A1111 prompt editing, alternation and AND (clipworks.conditioning.schedule) against A1111's own outputs.

tests/data/a1111_prompt_schedules.json holds AUTOMATIC1111's results, generated once outside this repository with
its modules/prompt_parser.py at commit 28bd8e142d5f77b71ae8d7d7140b5da1b3a49906 and lark 1.3.1:

    .venv/bin/python tests/gen_a1111_schedules.py --a1111 /tmp/a1111 --count 400 --seed 20

(`/tmp/a1111` holding that prompt_parser.py). It covers the module's doctest prompts and 400 random prompts
(nesting, fractions, absolute steps, alternations, AND with weights, escapes, malformed brackets; steps in
{1, 4, 10, 20, 37}, some with hires_steps): `get_learned_conditioning_prompt_schedules` for each, and
`get_multicond_prompt_list` for those with AND. Every case must match.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipworks.conditioning import ScheduledConditioning, Weighted, parse_prompt, prompt_schedule, split_and

FIXTURE = json.loads((Path(__file__).parent / "data" / "a1111_prompt_schedules.json").read_text())


def test_schedules_equal_a1111():
    cases = FIXTURE["schedules"]
    assert len(cases) >= 500
    wrong = [c for c in cases if [list(x) for x in prompt_schedule(c["prompt"], c["steps"], c["hires_steps"])]
             != c["expected"]]  # fmt: skip
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, first: {wrong[0]}"


def test_and_equal_a1111():
    cases = FIXTURE["and"]
    assert len(cases) >= 30
    for case in cases:
        assert [list(x) for x in split_and(case["prompt"])] == case["expected"], case["prompt"]


def test_doc_examples():
    assert prompt_schedule("a [cat:dog:0.5]", 10) == [(5, "a cat"), (10, "a dog")]
    assert prompt_schedule("[cat|dog]", 3) == [(1, "cat"), (2, "dog"), (3, "cat")]
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a | b [c:2]", 4) == [(4, "a | b [c:2]")]  # unreadable: the whole prompt as text
    assert split_and("a cat AND a dog:1.5") == [("a cat", 1.0), (" a dog", 1.5)]


def test_escaped_colon_differs_from_a1111():
    """`\\:` is a literal colon here; A1111 drops the backslash and reads the weight (documented difference)."""
    a1111 = {c["prompt"]: c["expected"] for c in FIXTURE["attention"]}
    assert a1111[r"(a\:1.2)"] == [["a", 1.2]]
    assert [tuple(s[:2]) for s in parse_prompt(r"(a\:1.2)")] == [("a:1.2", pytest.approx(1.1))]
    assert a1111[r"a\:b"] == [["a:b", 1.0]] and parse_prompt(r"a\:b")[0].text == "a:b"  # same outside brackets
    assert prompt_schedule(r"[a\:b:2]", 4) == [(2, ""), (4, r"a\:b")]  # the schedule keeps the escape


def test_bad_input():
    for call in (lambda: prompt_schedule(3, 10), lambda: prompt_schedule("a", 0), lambda: split_and(None),
                 lambda: prompt_schedule("a", 5, hires_steps=True)):  # fmt: skip
        with pytest.raises(ValueError):
            call()


def test_each_text_encoded_once():
    calls: list[str] = []

    def encoder(text):
        calls.append(text)
        return f"<{text}>"

    cond = ScheduledConditioning(encoder, "a [cat:dog:0.5] [x|y] AND snow:0.5", steps=10)
    seen = [cond.at(step) for step in range(11)]
    assert sorted(calls) == sorted(set(calls))  # no text encoded twice
    assert set(calls) == {"a cat x", "a cat y", "a dog x", "a dog y", " snow"}
    assert seen[0] == seen[1] == [Weighted("<a cat x>", 1.0), Weighted("< snow>", 0.5)]  # A1111's 0-based lookup
    assert seen[2][0].conditioning == "<a cat y>" and seen[10][0].conditioning == "<a dog y>"
    with pytest.raises(ValueError, match="step"):
        cond.at(11)


def test_shared_cache_and_real_encoder():
    from test_conditioning import tiny_encoder

    from clipworks.conditioning import StableDiffusionText

    sd = StableDiffusionText(tiny_encoder())
    cache: dict = {}
    a = ScheduledConditioning(sd, "[cat:dog:2]", steps=4, cache=cache)
    b = ScheduledConditioning(sd, "dog", steps=4, cache=cache)
    (first,), (last,), (other,) = a.at(1), a.at(4), b.at(1)
    assert len(cache) == 2 and last.conditioning is other.conditioning
    assert first.conditioning.embeds.shape == (1, 77, 32)
    assert not first.conditioning.embeds.equal(last.conditioning.embeds)
