"""Writes tests/data/a1111_prompt_schedules.json: AUTOMATIC1111's own prompt schedules, AND splits and weights.

Run by hand (pytest does not collect it), with a copy of A1111's modules/prompt_parser.py outside this repository
(its licence is the AGPL; none of its code is kept here) and lark installed:

    .venv/bin/pip install lark==1.3.1
    .venv/bin/python tests/gen_a1111_schedules.py --a1111 /tmp/a1111 [--count 400] [--seed 20]

`--a1111` is the folder holding prompt_parser.py. The fixture records the commit given by `--commit`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

A1111_COMMIT = "28bd8e142d5f77b71ae8d7d7140b5da1b3a49906"
OUT = Path(__file__).parent / "data" / "a1111_prompt_schedules.json"
STEPS = (1, 4, 10, 20, 37)

# the prompts of the doctests of prompt_parser.py at A1111_COMMIT, and the example in its opening comment
DOCTEST_PROMPTS = [
    "test", "a [b:3]", "a [b: 3]", "a [[[b]]:2]", "[(a:2):3]", "a [b : c : 1] d", "a[b:[c:d:2]:1]e",
    "a [unbalanced", "a [b:.5] c", "a [{b|d{:.5] c", "((a][:b:c [d:3]", "[a|(b:1.1)]", "[fe|]male",
    "[fe|||]male", "a [b:1.5] c",
    "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
    "[ in background:0.25] [shoddy:masterful:0.5]",
]  # fmt: skip
# AND examples and the weights escape this project reads differently (see docs/conditioning.md)
AND_PROMPTS = [
    "a cat AND a dog", "a cat AND a dog:1.5 AND x :  -2 ", "ANDROID AND", "a:b AND c: .5", "AND", "a AND\nb:2.",
    "[a:b:0.5] AND (c:1.2):0.3", "a cat:1.2.3 AND b:+1", "ab AND_ cd",
]  # fmt: skip
ATTENTION_PROMPTS = [r"(a\:1.2)", r"a\:b", r"(16\:9)", r"\(a\)", r"(a:1.2)", r"a \| b"]

WORDS = ["cat", "dog", "a red fox", "oak", "sky", "lake", "x", "mountain", "blue", "", " ", "  in snow"]
NUMBERS = ["0.5", ".25", "0.3", "0.29", "1", "3", "5", "7", "12", "15", "25", "1.5", "1.25", "2.0", "0", "-1",
           "+2", "1e1", "2.5e-1", "1.", "0.99", "10", "40", " 3", "3 ", " .5 ", "100"]  # fmt: skip
NOISE = ["[", "]", "(", ")", ":", "|", "\\", "\\(", "\\[", "\\]", "\\:", "\\|", "{", "AND", "BREAK", ":1.2", "\n"]


def phrase(rng: random.Random, depth: int) -> str:
    """A random piece of prompt: words, weights, edits, alternations, nested up to `depth`."""
    kind = rng.randrange(7) if depth > 0 else 0
    if kind <= 1:
        return rng.choice(WORDS)
    inner = lambda: "".join(phrase(rng, depth - 1) for _ in range(rng.randint(1, 2)))  # noqa: E731
    if kind == 2:
        return rng.choice(["({})", "[{}]", "({}:1.3)", "(({}))", "({}:0.5)"]).format(inner())
    if kind == 3:
        return f"[{inner()}:{inner()}:{rng.choice(NUMBERS)}]"
    if kind == 4:
        return f"[{inner()}:{rng.choice(NUMBERS)}]" if rng.random() < 0.6 else f"[{inner()}::{rng.choice(NUMBERS)}]"
    if kind == 5:
        return "[" + "|".join(inner() if rng.random() < 0.85 else "" for _ in range(rng.randint(2, 4))) + "]"
    return inner() + " " + inner()


def random_prompt(rng: random.Random) -> str:
    """A prompt of a few phrases, sometimes joined by AND with weights, sometimes damaged with stray syntax."""
    text = ", ".join(phrase(rng, rng.randint(1, 3)) for _ in range(rng.randint(1, 3)))
    if rng.random() < 0.15:
        text += f" AND {phrase(rng, 2)}" + rng.choice(["", ":0.5", " : 1.5", ":-0.7"])
    for _ in range(rng.choice([0, 0, 0, 1, 2])):  # malformed input: insert or delete a character
        i = rng.randrange(len(text) + 1)
        text = text[:i] + rng.choice(NOISE) + text[i:] if rng.random() < 0.7 else text[:i] + text[i + 1 :]
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a1111", required=True, help="folder holding A1111's modules/prompt_parser.py")
    parser.add_argument("--commit", default=A1111_COMMIT, help="the A1111 commit that file comes from")
    parser.add_argument("--count", type=int, default=400, help="random prompts")
    parser.add_argument("--seed", type=int, default=20)
    args = parser.parse_args()
    sys.path.insert(0, args.a1111)
    import prompt_parser as pp  # noqa: PLC0415 (A1111's module, found through --a1111)

    rng = random.Random(args.seed)
    prompts = DOCTEST_PROMPTS + [random_prompt(rng) for _ in range(args.count)]
    schedules = []
    for i, prompt in enumerate(prompts):
        steps = 10 if i < len(DOCTEST_PROMPTS) else rng.choice(STEPS)
        hires = rng.choice([None, None, None, steps, 7])
        for hires_steps in dict.fromkeys([None, hires]):
            expected = pp.get_learned_conditioning_prompt_schedules([prompt], steps, hires_steps)[0]
            schedules.append({"prompt": prompt, "steps": steps, "hires_steps": hires_steps, "expected": expected})
    and_prompts = AND_PROMPTS + [p for p in prompts if "AND" in p]
    splits = []
    for prompt in and_prompts:
        indexes, flat, _ = pp.get_multicond_prompt_list([prompt])
        splits.append({"prompt": prompt, "expected": [[flat[i], w] for i, w in indexes[0]]})
    attention = [{"prompt": p, "expected": pp.parse_prompt_attention(p)} for p in ATTENTION_PROMPTS]
    fixture = {
        "source": f"AUTOMATIC1111/stable-diffusion-webui@{args.commit} modules/prompt_parser.py",
        "command": f"python tests/gen_a1111_schedules.py --a1111 DIR --count {args.count} --seed {args.seed}",
        "lark": pp.lark.__version__,
        "schedules": schedules,
        "and": splits,
        "attention": attention,
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(fixture, indent=0, ensure_ascii=False) + "\n")
    print(f"{len(schedules)} schedules, {len(splits)} AND splits, {len(attention)} weights -> {OUT}")


if __name__ == "__main__":
    main()
