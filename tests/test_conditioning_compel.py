"""compel's prompt syntax and embedding math against the compel package (parse trees; SD 1.x and SDXL tensors)."""

from __future__ import annotations

import random

import pytest
import torch

from clipworks.conditioning import (
    ClipSkip,
    CompelBlend,
    CompelSwap,
    PromptReader,
    SDXLText,
    Segment,
    StableDiffusionText,
    parse_compel,
    text_encoder_from_transformers,
)

compel = pytest.importorskip("compel")
transformers = pytest.importorskip("transformers")
from test_conditioning_parity import hf_text_model, hf_tokenizer  # noqa: E402

# Every example in compel's doc/syntax.md, and prompts from compel's own parser tests.
DOC_EXAMPLES = [
    "a tall thin man picking apricots+", "a tall thin man picking (apricots)+", "a tall thin man picking (apricots)-",
    "a tall thin man (picking apricots)+", "a tall thin man (picking apricots)-", "a tall thin man (picking apricots)++",
    "a tall thin man (picking apricots+)++", "a tall thin man picking (apricots)1.1",
    "a tall thin man (picking (apricots)1.3)1.1", "a man picking apricots from a tree",
    "a man picking apricots- from a tree", "a man picking apricots-- from a tree", "a man picking apricots--- from a tree",
    "a man picking apricots+ from a tree", "a man picking apricots++ from a tree", "a man picking apricots+++ from a tree",
    "a man picking apricots++++ from a tree", "a man picking apricots+++++ from a tree", "mountain man", "mountain+ man",
    "mountain++ man", "mountain+++ man", "mountain man+", "mountain man++", "mountain man+++", "mountain man++++",
    '("spider man", "robot mech").blend(1, 0.8)',
    '("A dream of a distant galaxy, by Caspar David Friedrich, matte painting", "trending on artstation, HQ").and()',
    "A dream of a distant galaxy, by Caspar David Friedrich, matte painting, trending on artstation, HQ",
]  # fmt: skip
PARSER_TESTS = [
    "", "fire (flames)", "fire, flames , fire", "cat hot-dog eating", "Dalí", "(flames).attend(0.5)", "flames.attend(0.5)",
    '"flames".attend(0.5)', "(flames)+", '"flames"+', "flames.attend(+)", "(flames)--", "(flowers)--- flames+++",
    "(pretty flowers)+, the flames are too hot", "(a text.)0.7. (a second text.)0.8", '"a text."0.7. "a second text."0.8',
    "flowers fire-- flames", '("fire", "flames").and(1,1)', '("(fire)2.0", "flames-").and()', '("fire", "flames").and(2,1)',
    '("mountain man", "a person with a hat (riding a bicycle.swap(skateboard))++").and(0.5, 0.5)',
    "a badly (formed +test prompt", "a badly (formed +test )prompt", "(a (ba)dly (f)ormed +test +prompt",
    '("((a badly (formed +test ").blend(1.0)', "hamburger ((kaiser roll))", "(mountain, man).blend()",
    "((mountain), (tall man)).blend()", '("fire", "fire flames (hot)++", "hi").blend(0.7, 0.3, 1.0)', '("fire").blend(0.7)',
    '("fire", "").blend(0.7, 1)', '("fire", "  ,  ").blend(0.7, 1)', '("mountain, man, hairy", "face, teeth, eyes--").blend(1,-1)',
    '("mountain, man, hairy", "face, teeth, eyes--").blend(1,-1,no_normalize)', "fire (flames (trees)1.5)2.0",
    '(\\"mountain\\")+ (\\(man\\))-', 'hairy ("mountain, \\"man\\"" with a (beard)2.0)+', "mountain (m\\(an).swap(m\\(onkey)",
    "a cat.swap(dog, shape_freedom=0.5) eating", "mountain withLora(hairy, 0.5) man withLora(ugly, 0.2)",
    '("mountain", "man withLora(hairy, 0.5)").blend()', "(happy camper:0.3)", "(test1, 1test, test1test)",
    "middle age,fantasy++ style", "withLora(hairy)",
]  # fmt: skip
# Where compel raises, clipworks reads the text: no error, and the construct is plain words.
COMPEL_RAISES = ['("fire", "flames").and(2)', '("fire", "fire flames").blend(0.7)', '((mountain), "cat.swap(dog)").blend()',
                 '("a", "b").blend() trailing', "a\x0bb"]  # fmt: skip
WORDS = ["cat", "a", "red", "hot-dog", "fire", "x1", "1.5", "-2", "Dalí", "e5", "no_normalize", "and"]
ATOMS = ["+", "-", "++", "(", ")", '"', ",", ".", "\\(", '\\"', "\\,", "=", ":", "1.3", ".7", "2", "  ", "\t"]


def _fragment(r: random.Random, depth: int) -> str:
    k, word = r.random(), r.choice(WORDS)
    if depth > 1 or k < 0.35:
        return word + r.choice(["", "", "", "+", "-", "++", "--", ","])
    inner = lambda: _phrase(r, depth + 1)  # noqa: E731
    if k < 0.55:
        return f"({inner()})" + r.choice(["", "+", "-", "1.3", "0.5", "--", " ", "2"])
    if k < 0.65:
        return f'"{inner()}"' + r.choice(["", "+", "0.8", "-"])
    if k < 0.72:
        return r.choice([word, f"({inner()})"]) + ".attend(" + r.choice(["+", "--", "0.7", "1.2", "x"]) + ")"
    if k < 0.78:
        return f"{word}.swap({_phrase(r, 3)}" + r.choice(["", ", s_start=0.1", ", shape_freedom=0.5"]) + ")"
    if k < 0.82:
        return r.choice(["withLora", "useLora"]) + f"({word}" + r.choice(["", ", 0.5", ",0.3"]) + ")"
    return r.choice(ATOMS) if k < 0.92 else word + r.choice(ATOMS) + r.choice(WORDS)


def _phrase(r: random.Random, depth: int = 0) -> str:
    return r.choice([" ", " ", "", ", "]).join(_fragment(r, depth) for _ in range(r.randint(1, 4)))


def random_prompt(r: random.Random) -> str:
    """Prompts that mix every construct, well- and badly formed."""
    if r.random() < 0.55:
        return _phrase(r)
    n = r.randint(1, 3)
    operands = ", ".join(r.choice([f'"{_phrase(r, 1)}"', f"({_phrase(r, 1)})", r.choice(WORDS)]) for _ in range(n))
    weights = ", ".join(r.choice(["1", "0.7", "0.3", "-1", "2", ".5"]) for _ in range(n if r.random() < 0.8 else 2))
    if r.random() < 0.6:
        weights += r.choice(["", "", ", no_normalize"])
        return f"({operands}).blend({weights})" + r.choice(["", "", " withLora(x, 0.5)", " extra"])
    return f"({operands}).{r.choice(['and', 'add'])}({weights})" + r.choice(["", "", " trailing"])


def reference_tree(c) -> tuple:
    """compel's parse (a Conjunction) as plain tuples: parts, part weights, loras."""
    from compel.prompt_parser import Blend, CrossAttentionControlSubstitute

    def frag(f):
        if isinstance(f, CrossAttentionControlSubstitute):
            return ("swap", tuple(map(frag, f.original)), tuple(map(frag, f.edited)), tuple(sorted(f.options.items())))
        return (f.text, f.weight)

    def part(p):
        if isinstance(p, Blend):
            prompts = tuple(tuple(map(frag, q.children)) for q in p.prompts)
            return ("blend", prompts, tuple(map(float, p.weights)), p.normalize_weights)
        return tuple(map(frag, p.children))

    loras = tuple((lora.model, float(lora.weight)) for lora in c.lora_weights)
    return tuple(map(part, c.prompts)), tuple(map(float, c.weights)), loras


def our_tree(c) -> tuple:
    def frag(f):
        if isinstance(f, CompelSwap):
            return ("swap", tuple(map(frag, f.original)), tuple(map(frag, f.edited)), f.options)
        return (f.text, f.weight)

    def part(p):
        if isinstance(p, CompelBlend):
            return ("blend", tuple(tuple(map(frag, q.fragments)) for q in p.prompts), p.weights, p.normalize)
        return tuple(map(frag, p.fragments))

    return tuple(map(part, c.parts)), c.weights, c.loras


def compare(prompts: list[str]) -> tuple[int, int]:
    """(prompts whose trees are equal, prompts compel refuses); asserts the rest are none."""
    parser, equal, refused = compel.PromptParser(), 0, 0
    for text in prompts:
        try:
            want = reference_tree(parser.parse_conjunction(text))
        except Exception:
            refused += 1
            parse_compel(text)  # never raises
            continue
        assert our_tree(parse_compel(text)) == want, text
        equal += 1
    return equal, refused


def test_parse_equals_compel_on_its_documentation_and_tests():
    equal, refused = compare(DOC_EXAMPLES + PARSER_TESTS)
    assert (equal, refused) == (len(DOC_EXAMPLES) + len(PARSER_TESTS), 0)


def test_parse_equals_compel_on_random_prompts():
    r = random.Random(0)
    equal, refused = compare([random_prompt(r) for _ in range(150)])
    assert equal >= 130 and refused <= 20


def test_malformed_input_reads_literally():
    for text in COMPEL_RAISES:
        with pytest.raises(Exception):
            compel.PromptParser().parse_conjunction(text)
    assert parse_compel('("fire", "flames").and(2)').parts[0].fragments == (Segment("fire , flames .and(2)", 1.0),)
    blend = parse_compel('("fire", "fire flames").blend(0.7)')
    assert blend.parts[0].fragments[0].text == "fire , fire flames .blend(0.7)"
    assert parse_compel('("a", "b").blend() trailing').parts[0].fragments[0].text == "a , b .blend() trailing"
    assert parse_compel("a\x0bb").parts[0].fragments == (Segment("a b", 1.0),)
    assert parse_compel("cat+ withLora(x)").loras == (("x", 1.0),)
    with pytest.raises(ValueError, match="must be a str"):
        parse_compel(None)


EMBED_PROMPTS = [
    "a man picking apricots++ from a tree", "a (tall thin)1.3 man picking apricots-- from a tree, (dusk)0.5",
    '("spider man", "robot mech").blend(1, 0.8)', '("a red fox (in snow)+", "watercolor").and(1, 0.6)',
    '("mountain, man", "face, eyes--").blend(1,-0.5,no_normalize)', "a cat.swap(dog) on a (mat)0",
    "plain words only", " ".join(["cat-"] * 50) + " " + " ".join(["dog"] * 40),
]  # fmt: skip
NEGATIVES = ["blurry-", "", "ugly", "", "(low quality)0.3", "", "bad++", ""]


@pytest.fixture(scope="module")
def encoders():
    enc = hf_text_model(transformers.CLIPTextModel, 32, "quick_gelu", 0)
    enc_2 = hf_text_model(transformers.CLIPTextModelWithProjection, 48, "gelu", 1)
    return (enc, enc_2), (text_encoder_from_transformers(enc), text_encoder_from_transformers(enc_2))


def _reference(c, prompts, negatives):
    pos = [c(p) for p in prompts]
    neg = [c(n) for n in negatives]
    out = []
    for i in (0, 1) if isinstance(pos[0], tuple) else (None,):
        a = [x if i is None else x[i] for x in pos]
        b = [x if i is None else x[i] for x in neg]
        if a[0].ndim == 3:
            padded = c.pad_conditioning_tensors_to_same_length(a + b)
            a, b = padded[: len(a)], padded[len(a) :]
        out += [torch.cat(a), torch.cat(b)]
    return out


def test_sd15_embeddings_equal_compel(encoders):
    (enc, _), (ours, _) = encoders
    c = compel.Compel(tokenizer=hf_tokenizer("<|endoftext|>"), text_encoder=enc)
    want, want_neg = _reference(c, EMBED_PROMPTS, NEGATIVES)
    got = StableDiffusionText(ours, PromptReader(syntax="compel"))(EMBED_PROMPTS, NEGATIVES)
    assert got.embeds.shape == want.shape == (8, 154, 32)
    assert (got.embeds - want).abs().max() <= 1e-5 and (got.negative_embeds - want_neg).abs().max() <= 1e-5


def test_sdxl_embeddings_and_pooled_equal_compel(encoders):
    """Two compel instances, as compel's `CompelForSDXL` builds them (its multi-encoder `Compel` is deprecated)."""
    (enc, enc_2), (ours, ours_2) = encoders
    kind = compel.ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
    c_1 = compel.Compel(tokenizer=hf_tokenizer("<|endoftext|>"), text_encoder=enc, returned_embeddings_type=kind)
    # requires_pooled=True: compel fails on an `.and()` part weight (its empty conditioning comes back as a tuple),
    # so the pooled reference is read from its provider, as `build_conditioning_tensor` does.
    c_2 = compel.Compel(tokenizer=hf_tokenizer("!"), text_encoder=enc_2, returned_embeddings_type=kind)
    prompts, negatives = EMBED_PROMPTS[:5], NEGATIVES[:5]
    want_1, want_neg_1 = _reference(c_1, prompts, negatives)
    want_2, want_neg_2 = _reference(c_2, prompts, negatives)
    with torch.no_grad():
        pooled, pooled_neg = (c_2.conditioning_provider.get_pooled_embeddings(t) for t in (prompts, negatives))
    want, want_neg = torch.cat([want_1, want_2], -1), torch.cat([want_neg_1, want_neg_2], -1)
    got = SDXLText(ours, ours_2, PromptReader(syntax="compel"))(prompts, negatives, layer=ClipSkip.sdxl())
    assert got.embeds.shape == want.shape == (5, 154, 80)
    pairs = ((got.embeds, want), (got.negative_embeds, want_neg), (got.pooled, pooled), (got.negative_pooled, pooled_neg))
    for a, b in pairs:
        assert (a - b).abs().max() <= 1e-5
