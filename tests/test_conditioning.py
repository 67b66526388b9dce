"""Diffusion text conditioning without a reference: CLIP skip conventions, the prompt parser, chunks, weights."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from clipworks.conditioning import (
    BREAK,
    ClipSkip,
    PromptReader,
    SDXLText,
    Segment,
    StableDiffusionText,
    apply_weights,
    encode_hidden,
    encode_prompt,
    frame_chunks,
    parse_prompt,
    plain_prompt,
    split_chunks,
)
from clipworks.config import TextConfig
from clipworks.models.text import TextTransformer
from clipworks.tokenizer import default_tokenizer

TOK = default_tokenizer()
CAT, DOG = TOK.encode("cat")[0], TOK.encode("dog")[0]
COMMA = TOK.encode(",")[0]


@functools.cache
def tiny_encoder(width: int = 32, seed: int = 0) -> TextTransformer:
    """A random 3-layer text tower (cached: the tests only read it)."""
    torch.manual_seed(seed)
    return TextTransformer(TextConfig(width=width, heads=2, layers=3), embed_dim=24).eval()


# --- CLIP skip -------------------------------------------------------------------------------------------------


def test_clip_skip_conventions_and_equivalences():
    assert ClipSkip.a1111(1) == ClipSkip.diffusers(None) == ClipSkip.diffusers(0) == ClipSkip(-1, True)
    for n in range(1, 5):
        assert ClipSkip.a1111(n) == ClipSkip.diffusers(n - 1) == ClipSkip(-n, True)
    assert ClipSkip.sdxl(None) == ClipSkip.sdxl(0) == ClipSkip(-2, False)
    assert ClipSkip.sdxl(2) == ClipSkip(-4, False)


@pytest.mark.parametrize(
    "make", [lambda: ClipSkip.a1111(0), lambda: ClipSkip.diffusers(-1), lambda: ClipSkip.sdxl(True),
             lambda: ClipSkip(0), lambda: ClipSkip.a1111(1.5), lambda: ClipSkip.diffusers(False)],
)  # fmt: skip
def test_clip_skip_rejects_bad_settings(make):
    with pytest.raises(ValueError, match="must be"):
        make()


def test_encode_prompt_picks_the_named_state():
    enc, ids = tiny_encoder(), TOK(["a photo of a cat", "two dogs"])
    with torch.no_grad():
        full = enc.forward_hidden(ids)
        assert torch.equal(encode_prompt(enc, ids), full.last_hidden)
        assert torch.equal(encode_prompt(enc, ids, ClipSkip.a1111(2)), enc.ln_final(full.hidden_states[-2]))
        assert torch.equal(encode_prompt(enc, ids, ClipSkip.sdxl(1)), full.hidden_states[-3])
        assert torch.equal(encode_prompt(enc, ids, ClipSkip(-4, False)), full.hidden_states[0])
        states = encode_hidden(enc, ids, ClipSkip.sdxl(), pooled=True)
        assert torch.equal(states.pooled, full.pooled)
    with pytest.raises(ValueError, match="3-layer text tower has 4 hidden states"):
        encode_prompt(enc, ids, ClipSkip.a1111(5))


# --- prompt syntax ---------------------------------------------------------------------------------------------

TABLE = [  # prompt, [(text, weight)] with BREAK as ("BREAK", None)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("a [quiet] word", [("a ", 1.0), ("quiet", 1 / 1.1), (" word", 1.0)]),
    ("(cat:1.3) and (dog:0.5)", [("cat", 1.3), (" and ", 1.0), ("dog", 0.5)]),
    ("((a)) [[b]]", [("a", 1.21), (" ", 1.0), ("b", 1 / 1.21)]),
    ("[(a:2)]", [("a", 2 / 1.1)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("a \\\\ b \\: c", [("a \\ b : c", 1.0)]),
    ("(a: 0.5 ) (b:-1) (c:.5)", [("a", 0.5), (" ", 1.0), ("b", -1.0), (" ", 1.0), ("c", 0.5)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", None), ("b", 1.0)]),
    ("BREAKfast, BREAK", [("BREAKfast,", 1.0), ("BREAK", None)]),
    ("", [("", 1.0)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",  # A1111's own example
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
    # malformed: the documented literal readings
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("a [b", [("a ", 1.0), ("b", 1 / 1.1)]),
    ("closed) only]", [("closed) only]", 1.0)]),
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),
    ("[a:2]", [("a:2", 1 / 1.1)]),
    ("a:2)", [("a:2)", 1.0)]),
    ("(a:)", [("a:", 1.1)]),
    ("(a:1.3", [("a:1.3", 1.1)]),
    ("(((]]]", [("]]]", 1.331)]),
    ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 1 / 1.1)]),
]  # fmt: skip


@pytest.mark.parametrize("prompt,expected", TABLE)
def test_parse_prompt_weights(prompt, expected):
    got = parse_prompt(prompt)
    assert [s.text if not s.is_break else "BREAK" for s in got] == [t for t, _ in expected]
    for seg, (_, weight) in zip(got, expected):
        assert seg.is_break == (weight is None)
        if weight is not None:
            assert seg.weight == pytest.approx(weight, rel=1e-12)


def test_parse_never_raises_and_keeps_every_word_character():
    rng = random.Random(0)
    for _ in range(2000):
        prompt = "".join(rng.choice("ab ()[]:\\1.-") for _ in range(rng.randrange(0, 24)))
        segments = parse_prompt(prompt)
        letters = "".join(s.text for s in segments)
        assert [c for c in letters if c in "ab"] == [c for c in prompt if c in "ab"], prompt


def test_plain_prompt_is_literal_and_bad_types_are_named():
    assert plain_prompt("(a:1.3) BREAK [b]") == [Segment("(a:1.3) BREAK [b]", 1.0)]
    with pytest.raises(ValueError, match="prompt must be a str"):
        parse_prompt(None)
    with pytest.raises(ValueError, match="unknown prompt syntax 'invokeai'"):
        PromptReader(syntax="invokeai")


# --- chunks ----------------------------------------------------------------------------------------------------


def lengths(chunks):
    return [len(c.ids) for c in chunks]


def test_long_prompts_split_every_75_tokens():
    chunks = split_chunks([Segment(" ".join(["cat"] * 160), 1.0)], TOK)
    assert lengths(chunks) == [75, 75, 10] and all(set(c.ids) == {CAT} for c in chunks)
    assert lengths(split_chunks([Segment("", 1.0)], TOK)) == [0]


def test_break_ends_a_chunk():
    chunks = split_chunks(parse_prompt("cat, cat BREAK dog"), TOK)
    assert [c.ids for c in chunks] == [[CAT, COMMA, CAT], [DOG]]
    assert lengths(split_chunks(parse_prompt("BREAK cat"), TOK)) == [0, 1]


@pytest.mark.parametrize("cats,backtrack,expected", [
    (70, 20, [71, 30]),  # the comma 5 tokens before the end: the chunk is cut after it
    (55, 20, [56, 30]),  # 20 tokens before the end: still cut
    (54, 20, [75, 10]),  # 21 tokens before the end: too far, cut at 75
    (70, 0, [75, 26]),   # backtracking off
])  # fmt: skip
def test_comma_backtracking(cats, backtrack, expected):
    prompt = " ".join(["cat"] * cats) + ", " + " ".join(["dog"] * 30)
    chunks = split_chunks(parse_prompt(prompt), TOK, comma_backtrack=backtrack)
    assert lengths(chunks) == expected
    assert [t for c in chunks for t in c.ids] == TOK.encode(prompt)


def test_weights_follow_their_tokens_across_chunks():
    prompt = " ".join(["cat"] * 74) + " (dog:1.5) (dog:0.5) cat"
    chunks = split_chunks(parse_prompt(prompt), TOK)
    assert chunks[0].ids[-1] == DOG and chunks[0].weights[-1] == 1.5
    assert chunks[1].ids == [DOG, CAT] and chunks[1].weights == [0.5, 1.0]


def test_frame_chunks_uses_each_padding():
    prompts = [split_chunks([Segment("cat dog", 1.5)], TOK), split_chunks([Segment(" ".join(["cat"] * 80), 1.0)], TOK)]
    for pad in (49407, 0):
        framed = frame_chunks(prompts, TOK, pad)
        assert framed.chunks == 2 and framed.ids.shape == framed.weights.shape == (4, 77)
        assert framed.ids[0, :4].tolist() == [49406, CAT, DOG, 49407] and set(framed.ids[0, 4:].tolist()) == {pad}
        assert framed.ids[1, :2].tolist() == [49406, 49407] and set(framed.ids[1, 2:].tolist()) == {pad}  # empty
        assert framed.ids[3, :7].tolist() == [49406] + [CAT] * 5 + [49407]
        assert framed.weights[0, 1:3].tolist() == [1.5, 1.5] and (framed.weights[0, 3:] == 1).all()
    with pytest.raises(ValueError, match="fewer than a prompt has"):
        frame_chunks(prompts, TOK, 0, chunks=1)


# --- weights on hidden states ----------------------------------------------------------------------------------


def test_apply_weights_scales_then_restores_each_mean():
    hidden = torch.randn(3, 77, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    weights = torch.ones(3, 77)
    weights[0, 3] = 1.5
    weights[2, 5:8] = 0.5
    out = apply_weights(hidden, weights)
    assert torch.allclose(out.mean(dim=(1, 2)), hidden.mean(dim=(1, 2)), atol=1e-6)
    assert torch.equal(out[1], hidden[1])  # an unweighted row is untouched, whatever its batch holds
    scale = hidden[0].mean() / (hidden[0] * weights[0, :, None]).mean()
    assert torch.allclose(out[0, 3], hidden[0, 3] * 1.5 * scale) and torch.allclose(out[0, 4], hidden[0, 4] * scale)
    assert apply_weights(hidden, torch.ones(3, 77)) is hidden


def test_weighted_prompt_is_the_plain_prompt_reweighted():
    text = StableDiffusionText(tiny_encoder())
    plain = text("a cat on a mat").embeds
    weighted = text("a (cat:1.5) on a mat").embeds
    weights = torch.ones(1, 77)
    weights[0, 2] = 1.5
    assert torch.allclose(weighted, apply_weights(plain, weights), atol=1e-6)
    assert not torch.allclose(weighted, plain, atol=1e-3)


def test_sdxl_long_prompts_give_aligned_chunks_for_both_encoders():
    sdxl = SDXLText(tiny_encoder(32, 0), tiny_encoder(48, 1))
    long = ", ".join(["a red cat"] * 30)  # 119 tokens: two chunks, the first cut at a comma
    out = sdxl([long, "a dog"], ["blurry", "BREAK BREAK ugly"])
    assert out.embeds.shape == out.negative_embeds.shape == (2, 3 * 77, 80)
    assert out.pooled.shape == (2, 24)
    # both encoders read the same chunks: the second chunk of each equals encoding its text on its own
    chunks = split_chunks(parse_prompt(long), TOK)
    second = TOK.decode(chunks[1].ids)
    alone = sdxl(second, "").embeds
    assert torch.allclose(out.embeds[:1, 77:154], alone[:, :77], atol=1e-6)


def test_negative_prompt_defaults():
    sdxl = SDXLText(tiny_encoder(32, 0), tiny_encoder(48, 1))
    zeros = sdxl("a cat")
    assert not zeros.negative_embeds.any() and not zeros.negative_pooled.any()
    empty = sdxl("a cat", "")
    assert empty.negative_embeds.abs().sum() > 0
    kept = SDXLText(tiny_encoder(32, 0), tiny_encoder(48, 1), force_zeros_for_empty_prompt=False)("a cat")
    assert torch.equal(kept.negative_embeds, empty.negative_embeds)
    with pytest.raises(ValueError, match="one item per prompt"):
        sdxl(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        StableDiffusionText(tiny_encoder())("a", ["b", "c"])
    assert BREAK.is_break
