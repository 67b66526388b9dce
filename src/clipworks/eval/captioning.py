"""Captioning metrics (BLEU-1..4, ROUGE-L, CIDEr-D) and the PTB-style caption tokenizer, in pure Python.

CLIP_benchmark's captioning task scores generated captions with pycocoevalcap (the COCO caption evaluation):
Stanford CoreNLP 3.4.1's PTBTokenizer run through Java (`-preserveLines -lowerCase`, then the tokens in
pycocoevalcap's PUNCTUATIONS list dropped), then Bleu(4), Meteor, Rouge, Cider and Spice. Here BLEU, ROUGE-L and
CIDEr are written out so that evaluation needs neither a JVM nor pycocoevalcap's 104 MB wheel; on the same
tokenized input they equal pycocoevalcap's numbers (tested in tests/test_caption_metrics.py to 1e-9). METEOR and
SPICE are not computed: both are Java programs (METEOR's jar; SPICE also downloads Stanford CoreNLP models).

The math, as pycocoevalcap computes it (Papineni et al. 2002; Lin 2004; Vedantam et al. 2015):
- BLEU: corpus-level clipped n-gram precisions (counts summed over images before dividing, each smoothed as
  (correct + 1e-15) / (guessed + 1e-9)), the geometric mean of the first k, and one brevity penalty from the
  summed candidate length and the summed "closest" reference length (the shorter one on a tie).
- ROUGE-L: per image, LCS precision and recall each maximised over the references (separately), F with
  beta = 1.2; the mean over images. Tokens are split on single spaces, as pycocoevalcap does.
- CIDEr-D: TF-IDF n-gram vectors (n = 1..4) with document frequencies counted over the images' reference
  sets; the candidate's weights clipped by the reference's; cosine per n, times a Gaussian length penalty
  (sigma = 6) on the difference in *bigram* counts (pycocoevalcap's "length" counts 2-grams); averaged over
  n and references, times 10; the mean over images.

`tokenize_captions` reimplements the tokenizer step for the inputs captions contain (words, contractions,
hyphens, slashes, numbers, abbreviations, quotes, brackets, dashes, ellipses, currency, unicode letters); it
equals the jar on the captions in the tests and on 1,000 random space-separated captions but 4. Known
differences from Stanford's JFlex lexer: a single letter's period ("x.") is kept where Stanford sometimes splits
it (at the end of a caption, or before "Mr."); the abbreviations that keep their period, and the capitalised
words after which a single letter's period is split ("plan b. Then"), are the common subset found by probing
the jar; words run together with punctuation and no spaces ("U.S.dog", "man's20%", "5o'clock") are split
differently; URLs, e-mail addresses and SGML tags are matched only roughly; control characters (which Stanford
deletes), phone numbers and rare Unicode symbols are not special-cased; a "\r" or other line separator inside a
caption, which shifts pycocoevalcap's line-by-line output onto the wrong captions, is read as a space. Like
Stanford's output, brackets become -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- and, lower-cased, are *not* in
pycocoevalcap's PUNCTUATIONS list, so they stay; "!!!" and "?!" stay too (only a lone "!" or "?" is dropped).
"""

from __future__ import annotations

import math
import re
from collections import Counter

# pycocoevalcap's PUNCTUATIONS (upper-case bracket names never match its lower-cased output).
_DROP = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}

_ABBREVS = set(
    "mr mrs ms miss dr drs prof profs sen sens rep reps atty attys lt col gen messrs gov govs adm rev maj sgt cpl "
    "pvt mt capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts det mm mme mmes mlle mlles jr sr "
    "bros blvd rd esq inc co cos corp ltd plc bancorp dept bhd assn univ intl sys vs etc al seq bldg pls wrt orig "
    "incl esp cf alex wm jos cie ft jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs "
    "fri calif mass conn fla ill mich pa va ariz tenn tex colo kans nev md wisc minn wash la ore ky ind del neb "
    "okla ala mont wyo".split()
)
_BEFORE_NUMBER = {"no", "nos", "fig", "figs", "art", "arts"}
# Words after which Stanford splits a single letter's period off ("plan b. Then"), found by probing the jar.
_SENTENCE_STARTS = set(
    "a an the we it there they this she in but so if at her our after when what then some".split()
)
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "lemme": "lem me",
                "gimme": "gim me", "wanna": "wan na", "y'all": "y' all", "'tis": "'t is", "'twas": "'t was"}
_KEPT_LEADING = {"'til", "'em", "'cause", "'n'"}
_SYMBOLS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-",
            "\u20ac": "$", "\u00a3": "#", "\u00a2": "cents", "\u2026": "...", "\u2014": "--", "\u2013": "--",
            '"': "''", "\u201c": "``", "\u201d": "''", "\u2018": "`", "\u2019": "'"}

_W = r"[\w\u0300-\u036f]"  # letters, digits, underscore, combining accents
_WORD_PART = rf"{_W}(?:{_W}|['\u2019](?={_W}))*"
# Tried at each position; as in Stanford's JFlex lexer the longest match wins, the earliest kind on a tie.
_KINDS = [(kind, re.compile(rx)) for kind, rx in [
    ("tag", r"</?[A-Za-z!?][^>\s]*>"),
    ("url", r"(?:https?|ftp)://\S*[^\s.,;:!?'\")\]]|www\.\S*[^\s.,;:!?'\")\]]|[\w.+-]+@\w[\w-]*(?:\.\w[\w-]*)+"),
    ("frac", r"(?:\d{1,4}[- \u00a0])?\d{1,4}/\d{1,4}(?:-\w+)*"),
    ("num", r"[-+]?(?:\d+(?:[.,:]\d+)*|\.\d+)(?:-\w+)*"),
    ("acro", r"(?:[A-Za-z]\.){2,}|[A-Za-z](?:\.[A-Za-z])+|(?:Ed|Ph)\.D\.?|[A-Z]+(?:&[A-Z]+)+"),
    ("lead", r"(?i)['\u2019](?:til|em|cause|tis|twas|n['\u2019]|\d\ds)(?![\w'\u2019])"),
    ("word", rf"{_WORD_PART}(?:[-/]{_WORD_PART})*\.?"),
    ("smiley", r"[:;]-?[()]"),
    ("hash", r"[#@][A-Za-z_]\w*"),
    ("dots", r"\.{3,}|\."),
    ("bang", r"[?!]+"),
    ("dash", r"-{2,}"),
    ("quote", r"``|''|['`]"),
    ("other", r"\S"),
]]
_SPACE = re.compile(r"\s+")


def tokenize_captions(texts: list[str]) -> list[str]:
    """PTB-tokenize, lower-case and drop punctuation tokens, as pycocoevalcap's PTBTokenizer does.

    Args:
        texts: raw captions; a newline inside one is read as a space (pycocoevalcap replaces it).

    Returns:
        One string per caption: the kept tokens joined by single spaces ("" when none are kept).
    """
    # pycocoevalcap feeds the captions to Java as the lines of one file: all but the last end in a newline,
    # which one of Stanford's lookaheads ("x. The" splits its period when "The" is followed by a space) sees.
    last = len(texts) - 1
    lines = [text.replace("\n", " ") + ("\n" if i < last else "") for i, text in enumerate(texts)]
    return [" ".join(t for t in _ptb_tokens(line) if t not in _DROP) for line in lines]


def _ptb_tokens(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while True:
        space = _SPACE.match(text, pos)
        pos = space.end() if space else pos
        if pos >= len(text):
            return [t.lower() for t in tokens]
        kind, match = max(((k, rx.match(text, pos)) for k, rx in _KINDS), key=lambda km: len(km[1][0]) if km[1] else 0)
        tok, pos = match.group(), match.end()
        if kind in ("word", "lead"):
            tokens += _split_word(tok, text[pos:])
        elif kind == "frac":
            tokens.append(_SPACE.sub("\u00a0", tok))
        elif kind == "smiley":
            tokens.append(tok[:-1] + _SYMBOLS[tok[-1]])
        elif kind in ("dots", "dash"):
            tokens.append(tok if len(tok) == 1 else tok[:3 if kind == "dots" else 2])
        elif kind == "quote":
            tokens.append("``" if tok == "``" else "''")  # every quote token is dropped later
        else:
            tokens.append(_SYMBOLS.get(tok, tok))


def _split_word(tok: str, rest: str) -> list[str]:
    """Stanford's splits of one word: a sentence-final period, contractions, leading quotes."""
    tail: list[str] = []
    if tok.endswith(".") and not _keeps_period(tok[:-1], rest):
        tok, tail = tok[:-1], ["."]
    tok = tok.replace("\u2019", "'")
    low = tok.lower()
    if low in _SPLIT_WORDS:
        return _SPLIT_WORDS[low].split() + tail
    if tok.startswith("'") and low not in _KEPT_LEADING and not tok[1:2].isdigit():
        return ["`"] + _split_word(tok[1:], "") + tail
    if "'n'" in low and not low.startswith("'n'"):
        i = low.index("'n'")
        return _split_word(tok[:i], "") + ["'n'"] + _split_word(tok[i + 3 :], "") + tail
    m = re.fullmatch(r"(.+?)(n't|'(?:s|re|ve|ll|d|m))", tok, re.IGNORECASE)
    if m and not (m.group(2).lower() == "n't" and m.group(1).endswith("'")):
        return [m.group(1), m.group(2)] + tail
    return [tok] + tail


def _keeps_period(base: str, rest: str) -> bool:
    """Whether Stanford keeps a word's final period as part of the word (an abbreviation)."""
    low = base.lower()
    if low in _ABBREVS:
        return True
    if low in _BEFORE_NUMBER:
        return re.match(r"\s*\d", rest) is not None
    if len(base) == 1 and base.isalpha():
        nxt = re.match(r"\s+([A-Z]\w*)(?=\s)", rest)
        return not (nxt and nxt.group(1).lower() in _SENTENCE_STARTS)
    return False


def _check(references: list[list[str]], candidates: list[str]) -> None:
    if not candidates:
        raise ValueError("no captions: expected one candidate caption and its references per image")
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} reference lists for {len(candidates)} candidates: expected one per image")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"image {i}: expected a non-empty list of reference captions, got {refs!r}")


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(references: list[list[str]], candidates: list[str], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenized captions, as pycocoevalcap's `Bleu(n)` (option "closest").

    Args:
        references: per image, its tokenized reference captions.
        candidates: per image, one tokenized candidate caption.
        n: the longest n-gram.
    """
    _check(references, candidates)
    if n < 1:
        raise ValueError(f"n = {n}: expected n >= 1")
    correct, guessed = [0] * n, [0] * n
    test_len = ref_len = 0
    for refs, cand in zip(references, candidates):
        words = cand.split()
        max_ref: Counter = Counter()
        for ref in refs:
            max_ref |= _ngrams(ref.split(), n)
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(n):
            guessed[k] += max(0, len(words) - k)
        test_len += len(words)
        ref_len += min((abs(len(r.split()) - len(words)), len(r.split())) for r in refs)[1]
    # pycocoevalcap's smoothing: 1e-15 / 1e-9 keep an empty count finite (and its score 0).
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + 1e-15) / (guessed[k] + 1e-9)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + 1e-15) / (ref_len + 1e-9)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [s * penalty for s in scores]


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(references: list[list[str]], candidates: list[str], beta: float = 1.2) -> float:
    """Mean per-image ROUGE-L F-score of tokenized captions, as pycocoevalcap's `Rouge()`.

    Precision and recall are each the best over an image's references. Tokens are split on single spaces,
    as pycocoevalcap does (so "" is one empty token).
    """
    _check(references, candidates)
    total = 0.0
    for refs, cand in zip(references, candidates):
        c = cand.split(" ")
        lcs = [(_lcs(r.split(" "), c), len(r.split(" "))) for r in refs]
        prec = max(m / len(c) for m, _ in lcs)
        rec = max(m / length for m, length in lcs)
        if prec and rec:
            total += (1 + beta**2) * prec * rec / (rec + beta**2 * prec)
    return total / len(candidates)


def _tfidf(counts: Counter, df: Counter, log_images: float, n: int) -> tuple[list[dict], list[float], int]:
    """Per order: n-gram TF-IDF weights and their norm; and the number of bigrams (pycocoevalcap's length)."""
    vec: list[dict] = [{} for _ in range(n)]
    for gram, tf in counts.items():
        vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
    return vec, norms, sum(c for g, c in counts.items() if len(g) == 2)


def cider(references: list[list[str]], candidates: list[str], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D of tokenized captions, as pycocoevalcap's `Cider()`: the mean over images.

    Document frequencies count, per n-gram, the images whose references contain it.
    """
    _check(references, candidates)
    ref_counts = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    df: Counter = Counter()
    for counts in ref_counts:
        df.update(set().union(*counts))
    log_images = math.log(len(candidates))
    total = 0.0
    for cand, counts in zip(candidates, ref_counts):
        vec, norm, length = _tfidf(_ngrams(cand.split(), n), df, log_images, n)
        per_order = [0.0] * n
        for ref in counts:
            rvec, rnorm, rlength = _tfidf(ref, df, log_images, n)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma**2))
            for k in range(n):
                # CIDEr-D clips the candidate's weights by the reference's.
                val = sum(min(w, rvec[k].get(g, 0.0)) * rvec[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] and rnorm[k]:
                    val /= norm[k] * rnorm[k]
                per_order[k] += val * penalty
        total += sum(per_order) / n / len(counts) * 10.0
    return total / len(candidates)


def caption_metrics(references: list[list[str]], generated: list[str]) -> dict[str, float]:
    """Bleu_1..Bleu_4, ROUGE_L and CIDEr of raw captions (tokenized first), under CLIP_benchmark's keys.

    Args:
        references: per image, its raw reference captions.
        generated: per image, one raw generated caption.
    """
    _check(references, generated)
    flat = tokenize_captions([r for refs in references for r in refs])
    tok_refs, start = [], 0
    for refs in references:
        tok_refs.append(flat[start : start + len(refs)])
        start += len(refs)
    tok_gen = tokenize_captions(generated)
    out = {f"Bleu_{k}": s for k, s in enumerate(bleu(tok_refs, tok_gen), 1)}
    out["ROUGE_L"] = rouge_l(tok_refs, tok_gen)
    out["CIDEr"] = cider(tok_refs, tok_gen)
    return out
