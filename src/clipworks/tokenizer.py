"""CLIP's byte-level BPE tokenizer: OpenAI's 49,408-token vocabulary, ids identical to OpenCLIP's.

The vocabulary and the text cleaning follow OpenAI's CLIP (MIT licence, Copyright (c) 2021 OpenAI,
see ``assets/NOTICE-openai-clip.txt``) as packaged by OpenCLIP (``open_clip.get_tokenizer("ViT-B-32")``),
and the ids are the same for every text, with one deliberate exception: text can never produce a
control token. The reference's pre-tokenizer regex special-cases ``<start_of_text>`` and
``<end_of_text>`` so that a caption containing them gets ids 49406/49407 in the middle; here such a
string is tokenized as ordinary punctuation and letters.

Four things make it fast without changing a single id:

* ``ftfy.fix_text`` and ``html.unescape`` are skipped when they provably cannot change the text:
  ASCII with no ``&`` (no HTML entity) and no control character other than tab/newline/carriage return
  (no terminal escape; line-break fixes only touch whitespace, which the cleaning collapses anyway).
  ftfy's mojibake, width, ligature, quote and normalization fixes all act on non-ASCII only.
* Whitespace-separated chunks of cleaned text are encoded once and kept in a bounded cache: no piece
  of the pre-tokenizer regex can match whitespace, so a text's ids are its chunks' ids concatenated.
* BPE merges come off a heap, O(n log n) in the word length instead of the reference's O(n^2); when
  only a context's worth of ids is needed, a long word is encoded only up to a token boundary that is
  provably one of the whole word's (see ``Tokenizer._bpe_prefix``).
* A batch is written into one numpy array, turned into a tensor once.

`TextTokenizer` is the interface it shares with `hf_tokenizer.HFTokenizer` (the other families' tokenizers), and
`pack` frames and pads a batch for both.
"""

import abc
import functools
import gzip
import heapq
import html
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import ftfy
import numpy as np
import regex
import torch

VOCAB_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses the first 49152 - 256 - 2 merges of the file: 256 bytes, 256 word-final bytes, the merges
# and two control tokens make 49,408 ids.
_NUM_MERGES = 49152 - 256 - 2

# The reference pattern without its ``<start_of_text>|<end_of_text>|`` prefix (see module docstring).
_WORD_RE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
# ASCII characters ftfy may change: every control character except tab, newline and carriage return.
_FTFY_SENSITIVE_ASCII_RE = re.compile(r"[^\t\n\r\x20-\x7e]")
# Chunks longer than this are not cached: they are rare, and one 1 MB word must not pin 1 MB of cache.
_MAX_CACHED_CHUNK = 64
# Words longer than this (in bytes) are encoded only as far as a truncating call needs.
_LONG_WORD = 1024


def _bytes_to_unicode() -> dict[int, str]:
    """Maps each byte to a printable character, as GPT-2 and CLIP do, so BPE never sees raw bytes.

    The dict's order (printable bytes first, then the rest) is the order of the first 256 ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update((b, chr(256 + n)) for n, b in enumerate(others))
    return chars


def needs_fixing(text: str) -> bool:
    """Whether ``ftfy.fix_text`` or ``html.unescape`` might change ``text`` beyond its whitespace.

    False only for ASCII without ``&`` and without control characters other than ``\\t\\n\\r``.
    """
    if not text.isascii() or "&" in text:
        return True
    return not text.isprintable() and _FTFY_SENSITIVE_ASCII_RE.search(text) is not None


def clean_text(text: str) -> str:
    """The reference's ``clean='lower'``: ftfy, HTML unescaping twice, whitespace collapsed, lower case."""
    if needs_fixing(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class TokenizedText(NamedTuple):
    """A tokenized batch.

    Attributes:
        ids: (B, L) token ids: each text framed by its tokenizer's special tokens (CLIP: ``[sot, ..., eot]``), then
            padding (CLIP's is 0).
        lengths: (B,) number of real tokens, special ones included.
        attention_mask: (B, L) True on real tokens.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    attention_mask: torch.Tensor


class TextTokenizer(abc.ABC):
    """What every clipworks tokenizer offers: CLIP's BPE (`Tokenizer`) and a release's own files (`HFTokenizer`).

    Attributes:
        context_length: default tokens per text, special tokens included.
        vocab_size: number of token ids.
        pad_token_id: the id padding positions hold.
        sot_token_id: the id every text starts with, None when texts have no start token (T5, Gemma).
        eot_token_id: the id every text ends with (before padding), None when texts have no end token.
    """

    context_length: int
    vocab_size: int
    pad_token_id: int
    sot_token_id: int | None
    eot_token_id: int | None

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenizes text(s) to a (B, context_length) LongTensor, as OpenCLIP's tokenizer for the model does."""
        return self.tokenize(texts, context_length).ids

    @abc.abstractmethod
    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None) -> TokenizedText:
        """Ids, lengths (real tokens, special ones included) and attention mask of text(s)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without framing tokens and untruncated."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:  # fmt: skip
        """Text of one sequence of ids; `clean_up_tokenization_spaces` as transformers (`clean_up_spaces`)."""

    def batch_decode(self, batch, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
                     ) -> list[str]:  # fmt: skip
        """Texts of a batch of id sequences (a list of lists, or a 2-D tensor/array); see `decode`."""
        if isinstance(batch, (torch.Tensor, np.ndarray)):
            if batch.ndim != 2:
                raise ValueError(f"batch_decode takes a batch of id sequences (2-D), got shape {tuple(batch.shape)}")
            batch = batch.tolist()
        return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in batch]


def clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization`: no space before punctuation and English contractions."""
    for spaced, joined in _SPACED:
        text = text.replace(spaced, joined)
    return text


_SPACED = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
           (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


def as_texts(texts: str | Sequence[str]) -> list[str]:
    """One text or a sequence of texts as a list, checked to be strings."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not all(isinstance(t, str) for t in texts):
        bad = next(type(t).__name__ for t in texts if not isinstance(t, str))
        raise ValueError(f"texts must be a str or a sequence of str, got an item of type {bad}")
    return texts


def check_context_length(context_length: int, minimum: int = 2, room_for: str = "start and end") -> int:
    """`context_length` if it is an int with room for the tokens that frame every text."""
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < minimum:
        raise ValueError(f"context_length must be an int >= {minimum} (room for {room_for}), got {context_length!r}")
    return context_length


def ids_list(ids: Iterable[int] | torch.Tensor | np.ndarray) -> list[int]:
    """One sequence of ids (a list or a 1-D tensor/array) as a list of ints."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        if ids.ndim != 1:
            raise ValueError(f"decode takes one sequence of ids (1-D), got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    return [int(i) for i in ids]


def pack(rows: list[list[int]], length: int, prefix: Sequence[int] = (), suffix: Sequence[int] = (),
         pad_id: int = 0, pad_left: bool = False) -> TokenizedText:  # fmt: skip
    """Frames rows of text ids (each short enough to fit) as ``prefix + ids + suffix`` and pads them to `length`
    with `pad_id` (before the tokens when `pad_left`), in one array converted to tensors once."""
    batch = len(rows)
    text_lengths = np.fromiter(map(len, rows), dtype=np.int64, count=batch)
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(text_lengths.sum()))
    lengths = text_lengths + len(prefix) + len(suffix)
    start = length - lengths if pad_left else np.zeros(batch, dtype=np.int64)  # (B,) first real position
    offset = np.arange(length) - start[:, None]  # (B, L) position relative to the row's first real token
    ids = np.full((batch, length), pad_id, dtype=np.int64)  # (B, L)
    # Row-major boolean assignment lays each row's ids out in order.
    ids[(offset >= len(prefix)) & (offset < (text_lengths + len(prefix))[:, None])] = flat
    rows_index = np.arange(batch)
    for k, token in enumerate(prefix):
        ids[rows_index, start + k] = token
    for k, token in enumerate(suffix):
        ids[rows_index, start + len(prefix) + text_lengths + k] = token
    mask = (offset >= 0) & (offset < lengths[:, None])  # (B, L)
    return TokenizedText(torch.from_numpy(ids), torch.from_numpy(lengths), torch.from_numpy(mask))


class Tokenizer(TextTokenizer):
    """CLIP's byte-level BPE tokenizer, a drop-in for ``open_clip.get_tokenizer("ViT-B-32")``.

    Calling it returns the (B, context_length) id tensor OpenCLIP returns: ``[sot, text, eot]`` padded
    with 0, and text too long for the context cut so that the end token stays last. Unlike the reference,
    a literal ``<start_of_text>``/``<end_of_text>`` in the text is ordinary text, never a control token.

    Args:
        context_length: default number of tokens per text, framing included.
        cache_size: most whitespace-separated chunks whose ids are kept (oldest evicted first).
    """

    vocab_size = 49408
    sot_token_id = 49406
    eot_token_id = 49407
    pad_token_id = 0
    context_length = 77

    def __init__(self, context_length: int = 77, cache_size: int = 65536):
        self.context_length = self._check_context_length(context_length)
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.cache_size = cache_size
        self._load_vocab()
        self._cache: dict[str, tuple[int, ...]] = {}

    def _load_vocab(self) -> None:
        with gzip.open(VOCAB_PATH) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        byte_chars = _bytes_to_unicode()
        base = list(byte_chars.values())
        vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        assert len(vocab) == self.vocab_size
        self._vocab = vocab
        self._byte_decode = {ord(c): b for b, c in byte_chars.items()}
        ids = {token: i for i, token in enumerate(vocab)}
        # BPE runs on ids: byte b is id _byte_ids[b] (+256 at a word's end, the "</w>" variant), and
        # the pair (a, b) merges into id _merges[a << 16 | b]. Ids grow with merge rank, so the
        # merged id doubles as the rank.
        self._byte_ids = [ids[byte_chars[b]] for b in range(256)]
        self._merges = {ids[a] << 16 | ids[b]: ids[a + b] for a, b in merges}
        # Each token's bytes and whether it ends a word, built from its two halves (not by parsing
        # "</w>" out of its text, which a non-final token could in principle spell).
        token_bytes = [bytes([b]) for b in byte_chars] * 2
        is_final = [False] * 256 + [True] * 256
        for a, b in merges:
            token_bytes.append(token_bytes[ids[a]] + token_bytes[ids[b]])
            is_final.append(is_final[ids[b]])
        self._token_bytes = token_bytes
        self._is_final = is_final
        self._token_ids = {t: i for i, t in enumerate(token_bytes) if not is_final[i]}
        self._final_token_ids = {t: i for i, t in enumerate(token_bytes) if is_final[i]}
        self._max_token_bytes = max(map(len, token_bytes))

    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None) -> TokenizedText:
        """Tokenizes text(s) to ids, lengths and an attention mask.

        Args:
            texts: one text or a sequence of texts.
            context_length: tokens per text, framing included; None for ``self.context_length``.
        """
        texts = as_texts(texts)
        length = self.context_length if context_length is None else self._check_context_length(context_length)
        room = length - 2  # text tokens that fit between start and end
        return pack(self._encode_batch(texts, room), length, (self.sot_token_id,), (self.eot_token_id,))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without start and end tokens and untruncated."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._encode_batch([text], None)[0]

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:  # fmt: skip
        """Text of a sequence of ids, as the reference decodes it (word ends become spaces).

        Args:
            ids: token ids, a list or a 1-D tensor/array.
            skip_special_tokens: drop start tokens and stop at the first end token (so padding goes too).
            clean_up_tokenization_spaces: remove the spaces before punctuation (`clean_up_spaces`).
        """
        ids = ids_list(ids)
        if skip_special_tokens:
            end = ids.index(self.eot_token_id) if self.eot_token_id in ids else len(ids)
            ids = [i for i in ids[:end] if i != self.sot_token_id]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        chars = "".join(self._vocab[i] for i in ids)
        data = bytes(self._byte_decode[ord(c)] for c in chars)
        text = data.decode("utf-8", errors="replace").replace("</w>", " ")
        return clean_up_spaces(text) if clean_up_tokenization_spaces else text

    def _check_context_length(self, context_length: int) -> int:
        return check_context_length(context_length)

    def _encode_batch(self, texts: Sequence[str], limit: int | None) -> list[list[int]]:
        """Ids of each text, at most ``limit`` of them (if given)."""
        cache = self._cache
        maxsplit = -1 if limit is None else limit
        rows = []
        for text in texts:
            # For ASCII that needs no fixing, lower-casing then splitting is the whole cleaning.
            chunks = (clean_text(text) if needs_fixing(text) else text.lower()).split(None, maxsplit)
            if limit is not None and len(chunks) > limit:
                # Every chunk gives at least one id (after cleaning, the regex sees no whitespace but
                # " "), so the first ``limit`` chunks are enough; the last item is the unsplit rest.
                chunks.pop()
            ids: list[int] = []
            try:
                for chunk in chunks:
                    ids += cache[chunk]
            except KeyError:
                ids = self._encode_chunks(chunks, limit)
            rows.append(ids if limit is None or len(ids) <= limit else ids[:limit])
        return rows

    def _encode_chunks(self, chunks: list[str], limit: int | None) -> list[int]:
        """Ids of whitespace-free chunks, stopping once ``limit`` ids (if given) are reached."""
        ids: list[int] = []
        for chunk in chunks:
            chunk_ids = self._cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = self._encode_chunk(chunk, None if limit is None else limit - len(ids))
            ids += chunk_ids
            if limit is not None and len(ids) >= limit:
                break
        return ids

    def _encode_chunk(self, chunk: str, limit: int | None) -> Sequence[int]:
        """Ids of one whitespace-free chunk; a long one stops after ``limit`` ids (if given)."""
        if len(chunk) > _MAX_CACHED_CHUNK:
            ids: list[int] = []
            for match in _WORD_RE.finditer(chunk):
                word = match.group().encode("utf-8")
                if limit is not None and len(word) > _LONG_WORD:
                    ids += self._bpe_prefix(word, limit - len(ids))
                else:
                    ids += self._bpe(word)
                if limit is not None and len(ids) >= limit:
                    break
            return ids
        chunk_ids = tuple(itertools.chain.from_iterable(self._bpe(w.encode("utf-8")) for w in _WORD_RE.findall(chunk)))
        if self.cache_size:
            cache = self._cache
            if len(cache) >= self.cache_size:
                # Evict the oldest half (dicts keep insertion order): amortised O(1) per insert.
                for key in list(itertools.islice(cache, max(1, len(cache) // 2))):
                    cache.pop(key, None)
            cache[chunk] = chunk_ids
        return chunk_ids

    def _bpe_prefix(self, word: bytes, count: int) -> list[int]:
        """At least the first ``count`` ids of ``self._bpe(word)``, without encoding all of a long word.

        Two properties of BPE (shown for github/rust-gems' ``bpe`` crate, "Corollary II/IIIa") make
        this exact: the ids of a prefix ending on a token boundary of the word's encoding are that
        prefix's own encoding; and such a boundary is certain when the token before it is compatible
        (BPE of their joined bytes gives the two back) with every token that could start the rest.
        """
        size = 4 * count + 64
        while size < len(word):
            head = self._bpe(word[:size], final=False)
            ends = list(itertools.accumulate(len(self._token_bytes[t]) for t in head))
            # A few cut points from the end of the head back: one usually certifies quickly.
            for t in range(len(head), max(count, len(head) - 32) - 1, -1):
                if t and self._is_boundary(head[t - 1], word, ends[t - 1]):
                    return head[:t]
            size *= 2
        return self._bpe(word)

    def _is_boundary(self, last: int, word: bytes, cut: int) -> bool:
        """Whether the encoding of ``word`` surely has a boundary at byte ``cut``, after token ``last``.

        Tokens that cannot start the rest are ignored: the first token of an encoding is compatible
        with the second, so one compatible with no possible second token never comes first.
        """
        for end, token in self._tokens_at(word, cut):
            if not self._compatible(last, token) and (
                end == len(word) or any(self._compatible(token, nxt) for _, nxt in self._tokens_at(word, end))
            ):
                return False
        return True

    def _tokens_at(self, word: bytes, start: int) -> Iterator[tuple[int, int]]:
        """(end, token) for every token spelling ``word[start:end]`` (a word-final one at the end)."""
        for end in range(start + 1, min(start + self._max_token_bytes, len(word)) + 1):
            table = self._final_token_ids if end == len(word) else self._token_ids
            token = table.get(word[start:end])
            if token is not None:
                yield end, token

    def _compatible(self, left: int, right: int) -> bool:
        """Whether BPE of the two tokens' joined bytes gives the two tokens back."""
        data = self._token_bytes[left] + self._token_bytes[right]
        return self._bpe(data, final=self._is_final[right]) == [left, right]

    def _bpe(self, word: bytes, final: bool = True) -> list[int]:
        """BPE ids of one pre-tokenized word, merges taken lowest rank first, left to right on ties.

        The reference merges every occurrence of the best pair in one left-to-right pass, then looks
        again. A heap keyed by (rank, position) does the same merges in the same order because every
        merge's rank is higher than the ranks of the merges that made its two halves (checked over the
        whole vocabulary in the tests), so a merge never creates a pair that outranks the current one.
        """
        symbols = list(map(self._byte_ids.__getitem__, word))
        if final:
            symbols[-1] += 256  # a word-final byte is its "</w>" variant, 256 ids on
        n = len(symbols)
        if n == 1:
            return symbols
        merges = self._merges
        # Heap entries are the int rank * n + position: cheaper to compare than tuples.
        heap = [m * n + i for i in range(n - 1) if (m := merges.get(symbols[i] << 16 | symbols[i + 1]))]
        heapq.heapify(heap)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            merged, i = divmod(pop(heap), n)
            left = symbols[i]
            j = nxt[i]
            # Skip entries made stale by an earlier merge at i or at a neighbour (dead symbols are -1).
            if left < 0 or j < 0 or merges.get(left << 16 | symbols[j]) != merged:
                continue
            symbols[i] = merged
            symbols[j] = -1
            k = nxt[i] = nxt[j]
            if k >= 0:
                prv[k] = i
                if m := merges.get(merged << 16 | symbols[k]):
                    push(heap, m * n + i)
            p = prv[i]
            if p >= 0 and (m := merges.get(symbols[p] << 16 | merged)):
                push(heap, m * n + p)
        return [s for s in symbols if s >= 0]


@functools.cache
def default_tokenizer() -> Tokenizer:
    """The shared CLIP tokenizer (context length 77), loaded once per process."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
    """OpenCLIP's module-level `tokenize`: CLIP's BPE ids of `texts`, (B, context_length)."""
    return default_tokenizer()(texts, context_length)


def decode(output_ids: Iterable[int] | torch.Tensor | np.ndarray) -> str:
    """OpenCLIP's module-level `decode`: the text of one sequence of CLIP BPE ids, special tokens included."""
    return default_tokenizer().decode(output_ids)
