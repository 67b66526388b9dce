"""Captioning metrics and the PTB-style tokenizer against pycocoevalcap (CLIP_benchmark's captioning reference)."""

import random
import shutil

import pytest

from clipworks.eval.captioning import bleu, caption_metrics, cider, rouge_l, tokenize_captions

pytest.importorskip("pycocoevalcap")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402

VOCAB = "a man dog on the sits red bike street with two of".split()

CAPTIONS = [
    "A man's dog doesn't run.",
    '"Hello," she said (quietly)...',
    "It costs $1,000.50 or 20% off; 3/4 of U.S. people.",
    "A well-known e-mail at 5:30 p.m. Mr. Smith waves.",
    "café naïve Zoë — a dash – and en-dash",
    "Two  spaces   here.",
    "{braces} [brackets] and a/b or black/white",
    "'single quoted' and `back` ticks",
    "I'm sure you're right, we've seen they'll go and he'd stay",
    "x -- y - z --- w",
    "rock'n'roll at o'clock 'til the '90s",
    "A TV. ok. wow.. wait.... done…",
    "I cannot go, gonna wanna gotta",
    "the dogs' bones and the boss's cat",
    "can't won't ain't shouldn't",
    "hello!!! what?! really?",
    "It's 100%. €5 £3 ¢",
    "A 10-year-old boy with a 1/2-inch pipe and 2 1/2 cups",
    "-5 degrees, +3 at 3.5 and .5 in 1990s on the 2nd",
    "The man’s hat “quoted” don’t",
    "Vitamin C. and plan b. Then J. Smith",
    "Dr. Who met St. Nick in Jan. etc.",
    "No. 5 and No. more",
    "#hashtag @user foo@bar.com www.example.com",
    "smile :) or not :(",
    "A man riding a wave on top of a surfboard.",
    "a cat sitting on a laptop keyboard ",
    "",
    "   ",
    "ÜBER Straße ΑΒΓ Привет 日本語",
    "2:30pm or 9am",
    "a man/woman.",
    "x. The end",
]


def _ids(xs):
    return {i: x for i, x in enumerate(xs)}


def _random_sets(rng, images):
    refs, cands = [], []
    for _ in range(images):
        r = [" ".join(rng.choices(VOCAB, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 5))]
        if rng.random() < 0.2:
            r.append(r[0])  # a duplicate reference
        c = " ".join(rng.choices(VOCAB, k=rng.randint(0, 12)))  # 0 words: an empty candidate
        c = rng.choice(r) if rng.random() < 0.2 else c
        refs.append(r)
        cands.append(c)
    return refs, cands


@pytest.mark.parametrize("seed", range(300))
def test_metrics_equal_pycocoevalcap(seed):
    rng = random.Random(seed)
    refs, cands = _random_sets(rng, rng.randint(1, 8))
    gts, res = _ids(refs), _ids([[c] for c in cands])
    want_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert bleu(refs, cands) == pytest.approx(want_bleu, abs=1e-9, rel=0)
    assert rouge_l(refs, cands) == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-9, rel=0)
    assert cider(refs, cands) == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9, rel=0)


@pytest.fixture(scope="module")
def stanford_tokens():
    if shutil.which("java") is None:
        pytest.skip("java is not on PATH: pycocoevalcap's PTBTokenizer needs it")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One Java run (a few seconds) for the whole module.
    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(CAPTIONS)})
    return [out[i][0] for i in range(len(CAPTIONS))]


def test_tokenizer_equals_stanford(stanford_tokens):
    mine = tokenize_captions(CAPTIONS)
    diffs = [(c, s, m) for c, s, m in zip(CAPTIONS, stanford_tokens, mine) if s != m]
    assert not diffs


def test_caption_metrics_keys_and_tokenization():
    refs = [["A dog runs.", "The dog is running!"], ["Two cats (sleeping)."]]
    out = caption_metrics(refs, ["A dog runs", "two cats sleeping"])
    assert list(out) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    tok_refs = [["a dog runs", "the dog is running"], ["two cats -lrb- sleeping -rrb-"]]
    assert out["CIDEr"] == cider(tok_refs, ["a dog runs", "two cats sleeping"])
    assert out["ROUGE_L"] == rouge_l(tok_refs, ["a dog runs", "two cats sleeping"])


@pytest.mark.parametrize(
    "refs, cands, match",
    [
        ([], [], "no captions"),
        ([["a dog"]], ["a dog", "a cat"], "1 reference lists for 2 candidates"),
        ([["a dog"], []], ["a dog", "a cat"], "image 1"),
        (["a dog"], ["a dog"], "image 0"),
    ],
)
@pytest.mark.parametrize("fn", [bleu, rouge_l, cider, caption_metrics])
def test_bad_input_raises(fn, refs, cands, match):
    with pytest.raises(ValueError, match=match):
        fn(refs, cands)


def test_bleu_rejects_n_below_one():
    with pytest.raises(ValueError, match="n = 0"):
        bleu([["a"]], ["a"], n=0)
