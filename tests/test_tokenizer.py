"""Tokenizer tests: ids identical to OpenCLIP's on ordinary and hostile text, the API, and bounded cost."""

import html
import random

import ftfy
import numpy as np
import pytest
import regex
import torch

from clipworks.tokenizer import TokenizedText, Tokenizer, clean_text, default_tokenizer, needs_fixing

open_clip = pytest.importorskip("open_clip")

SOT, EOT = 49406, 49407

WORDS = (
    "a photo of the dog cat running on beach at sunset people watching red Blue GREEN it's don't they're "
    "we've I'm you'll he'd The QUICK brown fox jumps over lazy 2 3 1999 12:30 e-mail U.S.A. Mr. x-ray "
    "naïve café résumé Ünïcödé straße façade jalapeño Zürich São Paulo Kraków"
).split()
POOLS = {
    "ascii": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "digits": "0123456789",
    "punct": "!\"#$%'()*+,-./:;<=>?@[\\]^_`{|}~",
    "accents": "éèêëàâäôöûüçñÉÀÖÜßøåæœ\u0301\u0308",
    "emoji": "😀🎉👍🏽❤️🇫🇷👨‍👩‍👧🐶🌅",
    "cjk": "日本語中文한국어ひらがなカタカナ漢字",
    "space": " \t\r\n\u00a0\u2028\u2029\u3000\x0b\x0c\x1c\x1f\x85",
    "control": "\x00\x01\x07\x1b\x7f\x80\x9f",
    "zero_width": "\u200b\u200c\u200d\ufeff\u2060",
}
UNITS = (
    "&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&nbsp;", "&amp;amp;", "&#x27;", "&eacute;", "&", "&;",
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "’s", "‘quoted’", "“double”",
    "cafÃ©", "â€œquotedâ€\x9d", "Ã¼ber", "donâ€™t", "ðŸ˜€", "\x1b[31mred\x1b[0m", "ﬁne", "ＦＵＬＬ",
    "<|endoftext|>", "<|startoftext|>", "<b>", "</w>", "...", "!!!", "$1,000", "50%",
)
HOSTILE = (
    "", " ", "   \t\n ", "\u00a0", "\u2028\u2029", "\u200b", "&", "&amp;", "&amp;amp;lt;",
    "&lt;b&gt;bold&lt;/b&gt;", "It's", "IT'S", "they're we've I'm you'll he'd", "'s't're", "A PHOTO OF A DOG",
    "Hello,\tWorld!\r\n",
    "cafÃ© au lait", "The Mona Lisa â€” a painting", "ðŸ˜€ smile", "naïve café", "e\u0301", "ﬁsh ﬂower",
    "日本語のテキスト", "한국어 텍스트", "emoji 👨‍👩‍👧 family 🇫🇷", "\x00null\x01", "\x1b[1mbold\x1b[0m",
    "tab\there", "line\u2028sep", "zero\u200bwidth\ufeff", "1234567890", "3.14159", "a" * 300,
    "word " * 200, "x" * 80 + " y", "<b>not html</b> &amp; more", "&nbsp;&nbsp;spaced", "C++ & C#",
    "mañana", "ÅNGSTRÖM", "İstanbul", "ǅemal", "ΣΊΣΥΦΟΣ", "ﬀ", "①②③", "٣٤٥", "½ cup", "x²",
)


def _random_text(rng: random.Random) -> str:
    pools = rng.sample(sorted(POOLS), rng.randint(1, 4))
    parts = []
    for _ in range(rng.randint(0, 25)):
        kind = rng.random()
        if kind < 0.35:
            parts.append(rng.choice(WORDS))
        elif kind < 0.55:
            parts.append(rng.choice(UNITS))
        else:
            pool = POOLS[rng.choice(pools)]
            parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
        parts.append(rng.choice((" ", " ", " ", "", "  ", "\t", "\n", "\u00a0")))
    return "".join(parts)


def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = list(HOSTILE) + [_random_text(rng) for _ in range(n)]
    # A few long mixtures, past the context length.
    texts += [" ".join(_random_text(rng) for _ in range(30)) for _ in range(20)]
    return texts


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def reference_without_control_tokens():
    """The reference with its regex's ``<start_of_text>|<end_of_text>|`` alternative removed."""
    ref = open_clip.tokenizer.SimpleTokenizer()
    ref.pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    return ref


def test_ids_match_reference_on_a_hostile_corpus(tokenizer, reference):
    texts = _corpus(3000)
    ours, theirs = tokenizer(texts), reference(texts)
    assert ours.shape == theirs.shape == (len(texts), 77)
    mismatched = [texts[i] for i in range(len(texts)) if not torch.equal(ours[i], theirs[i])]
    assert not mismatched, mismatched[:5]
    for text in texts[::10]:
        assert tokenizer.encode(text) == reference.encode(text)


def test_ids_match_reference_at_other_context_lengths(tokenizer, reference):
    texts = _corpus(300, seed=1)
    for length in (2, 3, 16, 200):
        assert torch.equal(tokenizer(texts, context_length=length), reference(texts, context_length=length))


def test_ids_match_reference_on_words_up_to_2000_letters(tokenizer, reference):
    rng = random.Random(0)
    words = ["a" * 2000, "ab" * 1000, "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2000))]
    words += ["".join(rng.choice("aeioust") for _ in range(rng.randint(30, 300))) for _ in range(10)]
    for word in words:
        assert tokenizer.encode(word) == reference.encode(word)
        # The truncating call encodes long words only up to a certified boundary; it must agree too.
        assert torch.equal(tokenizer(word), reference(word))


def test_text_never_produces_control_tokens(tokenizer, reference_without_control_tokens):
    texts = [
        "<start_of_text>", "<end_of_text>", "a <start_of_text> b <end_of_text> c", "x<END_OF_TEXT>y",
        "<|startoftext|>a photo<|endoftext|>", "<start_of_text><start_of_text>", "&lt;end_of_text&gt;",
    ]
    batch = tokenizer.tokenize(texts)
    for row, n in zip(batch.ids, batch.lengths):
        assert row[0] == SOT and row[n - 1] == EOT
        assert not ((row[1 : n - 1] == SOT) | (row[1 : n - 1] == EOT)).any()
    assert torch.equal(batch.ids, reference_without_control_tokens(texts))
    for text in texts:
        assert not {SOT, EOT} & set(tokenizer.encode(text))


def test_the_ftfy_fast_path_is_exact():
    """Text that skips ftfy and html.unescape is text they would not change (beyond whitespace)."""
    rng = random.Random(0)
    ascii_pool = "".join(map(chr, range(0x20, 0x7F))) + "\t\n\r"
    texts = ["".join(rng.choice(ascii_pool) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += [a + b for a in ascii_pool for b in ascii_pool[::3]]
    skipped = [t for t in texts if not needs_fixing(t)]
    assert len(skipped) > 2500
    for text in skipped:
        fixed = html.unescape(html.unescape(ftfy.fix_text(text)))
        assert " ".join(fixed.split()) == " ".join(text.split()), repr(text)
    for text in ("caf\u00e9", "a &amp; b", "&", "\x1b[31m", "\x00", "\x0b", "\x0c", "\x7f", "\x1c", "\u2028"):
        assert needs_fixing(text)
    assert clean_text("  A&amp;amp;B\u00a0C  ") == "a&b c"


def test_bpe_merge_ranks_allow_heap_order(tokenizer):
    """Every merge outranks the merges that built its halves, so a heap replays the reference's order."""
    for pair, merged in tokenizer._merges.items():
        assert pair >> 16 < merged and pair & 0xFFFF < merged


def test_bpe_prefix_agrees_with_full_bpe(tokenizer):
    rng = random.Random(0)
    for _ in range(60):
        alphabet = rng.choice(("ab", "aab", "abc", "the", "aeiou", "abcdefghijklmnopqrstuvwxyz", "éü", "日本"))
        n = rng.randint(1100, 2500)
        if rng.random() < 0.5:
            unit = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
            word = (unit * n)[:n].encode()
        else:
            word = "".join(rng.choice(alphabet) for _ in range(n)).encode()
        count = rng.choice((1, 10, 75))
        full, prefix = tokenizer._bpe(word), tokenizer._bpe_prefix(word, count)
        assert len(prefix) >= min(count, len(full)) and full[: len(prefix)] == prefix


@pytest.mark.parametrize(
    "text", ["z" * 20_000, "ab" * 10_000, "word " * 200_000, "x" * 1_000_000, "é" * 500_000], ids=lambda t: t[:6]
)
def test_long_inputs_complete(tokenizer, text):
    batch = tokenizer.tokenize(text)
    assert batch.ids.shape == (1, 77) and batch.lengths.tolist() == [77]
    assert batch.ids[0, 0] == SOT and batch.ids[0, -1] == EOT
    if len(text) <= 20_000:
        assert batch.ids[0, 1:-1].tolist() == tokenizer.encode(text)[:75]


def test_cache_stays_within_its_limit():
    tok = Tokenizer(cache_size=100)
    rng = random.Random(0)
    for _ in range(20):
        tok(["".join(rng.choice("abcdefgh") for _ in range(6)) for _ in range(50)])
        assert len(tok._cache) <= 100
    tok.encode("y" * 1000)
    assert "y" * 1000 not in tok._cache
    uncached = Tokenizer(cache_size=0)
    assert uncached.encode("a photo") == tok.encode("a photo") and not uncached._cache


def test_call_and_tokenize(tokenizer):
    assert tokenizer.vocab_size == 49408 and tokenizer.context_length == 77
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.pad_token_id) == (SOT, EOT, 0)
    ids = tokenizer("a photo of a cat")
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert tokenizer(["a", "b c"], context_length=5).shape == (2, 5)
    assert tokenizer([]).shape == (0, 77)
    batch = tokenizer.tokenize(["a photo of a cat", "", "word " * 100])
    assert isinstance(batch, TokenizedText)
    assert batch.lengths.tolist() == [7, 2, 77]
    assert torch.equal(batch.attention_mask, torch.arange(77) < batch.lengths[:, None])
    assert batch.ids[1, :3].tolist() == [SOT, EOT, 0]
    assert not batch.ids[~batch.attention_mask].any()  # padding is 0
    assert Tokenizer(context_length=16)("a").shape == (1, 16)


@pytest.mark.parametrize("bad", [0, 1, -3, 7.0, True])
def test_bad_context_length_is_rejected(tokenizer, bad):
    with pytest.raises(ValueError, match="context_length"):
        tokenizer("a", context_length=bad)


def test_bad_texts_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="str"):
        tokenizer(["a", 3])
    with pytest.raises(ValueError, match="str"):
        tokenizer.encode(b"bytes")
    with pytest.raises(ValueError, match="49408"):
        tokenizer.decode([49408])


def test_decode_matches_reference(tokenizer, reference):
    for text in ("A photo of a CAT, it's 2024!", "naïve café 😀 日本語", "&amp; <b>", ""):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == reference.decode(ids)
        assert tokenizer.decode(torch.tensor(ids, dtype=torch.long)) == tokenizer.decode(np.array(ids))
    row = tokenizer("a photo of a cat")[0]
    assert tokenizer.decode(row, skip_special_tokens=True) == "a photo of a cat "
    with pytest.raises(ValueError, match="1-D"):
        tokenizer.decode(row[None])


def test_default_tokenizer_is_loaded_once():
    assert default_tokenizer() is default_tokenizer()
