"""The two ways a release's tokenizer files are run: a tokenizer.json pipeline with the Hugging Face `tokenizers`
library, or a T5-style SentencePiece model with the `sentencepiece` library. `hf_tokenizer.HFTokenizer` frames,
truncates and pads what they encode."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("reading a Hugging Face tokenizer needs the tokenizers package: "
                          "pip install 'clipworks[hub]'") from e  # fmt: skip
    return tokenizers


def _control_pieces(spec: dict[str, Any]) -> set[str]:
    """Special tokens the model itself can produce from text: a unigram model's control pieces ("</s>", "<pad>"
    are SentencePiece pieces). `encode_special_tokens` keeps special tokens from being split out of a text, but the
    unigram model would still match these; BPE models reach their special tokens by no merge."""
    model = spec.get("model") or {}
    if model.get("type") != "Unigram":
        return set()
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    return special & {piece for piece, _ in model["vocab"]}


def _without_control_pieces(spec: dict[str, Any], controls: set[str]) -> dict[str, Any]:
    """`spec` with its control pieces renamed so that no text matches them (to names ending in a newline, which
    cleaned text never holds) and dropped from the special tokens; every other id stays the same."""
    model = spec["model"]
    taken = {piece for piece, _ in model["vocab"]}

    def hidden(piece: str) -> str:
        while piece in taken:
            piece += "\n"
        taken.add(piece)
        return piece

    vocab = [[hidden(piece) if piece in controls else piece, score] for piece, score in model["vocab"]]
    added = [t for t in spec.get("added_tokens", []) if t["content"] not in controls]
    return {**spec, "model": {**model, "vocab": vocab}, "added_tokens": added}


class JSONEncoder:
    """A tokenizer.json pipeline (as transformers 5's class rebuilds it), encoding special-token strings as text.

    Texts in which the model matched a control piece (rare: a caption holding "</s>") are encoded again by a copy
    of the tokenizer whose control pieces are hidden, built the first time it is needed.
    """

    def __init__(self, spec: dict[str, Any], reload: Callable[[], dict[str, Any]]):
        self.tokenizer = self._build(spec)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self._controls = _control_pieces(spec)
        self._control_ids = {self.tokenizer.token_to_id(t) for t in self._controls}
        self._reload = reload
        self._text_only = None

    @staticmethod
    def _build(spec: dict[str, Any]):
        tokenizer = _tokenizers().Tokenizer.from_str(json.dumps(spec))
        tokenizer.encode_special_tokens = True
        return tokenizer

    def _encode(self, tokenizer, texts: list[str]) -> list[list[int]]:
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # tokenizers < 0.20 lacks it
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        rows = self._encode(self.tokenizer, texts)
        if self._control_ids:
            hits = [i for i, row in enumerate(rows) if not self._control_ids.isdisjoint(row)]
            if hits:
                if self._text_only is None:
                    self._text_only = self._build(_without_control_pieces(self._reload(), self._controls))
                for i, row in zip(hits, self._encode(self._text_only, [texts[i] for i in hits])):
                    rows[i] = row
        return rows

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def special_tokens(self) -> set[str]:
        return {str(t) for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}

    def file_framing(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix ids, suffix ids) the file's post-processor puts around a text."""
        probe = self.tokenizer.encode("a", add_special_tokens=True)
        mask, ids = probe.special_tokens_mask, probe.ids
        if 0 not in mask:
            return (), tuple(ids)
        first, last = mask.index(0), len(mask) - mask[::-1].index(0)
        return tuple(ids[:first]), tuple(ids[last:])


class SentencePieceEncoder:
    """A T5-style SentencePiece model read with the `sentencepiece` library (ids are its piece ids)."""

    def __init__(self, path: Path, extra_ids: int):
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(f"{path.parent} has a SentencePiece model and no tokenizer.json: reading it needs "
                              "the sentencepiece package: pip install 'clipworks[hub]'") from e  # fmt: skip
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size() + extra_ids  # T5's sentinel tokens follow the pieces

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def token_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        pieces, out, run = self.sp.get_piece_size(), [], []
        for i in ids:
            if i < pieces and not self.sp.is_control(i):
                run.append(i)
                continue
            out.append(self.sp.decode(run))
            run = []
            if not skip_special_tokens:  # T5's sentinels count down from the last id
                out.append(self.sp.id_to_piece(i) if i < pieces else f"<extra_id_{self.vocab_size - 1 - i}>")
        return "".join(out + [self.sp.decode(run)])

    @property
    def special_tokens(self) -> set[str]:
        return {self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size()) if self.sp.is_control(i)}

    def file_framing(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise AssertionError("SentencePiece tokenizers are always framed by their class")
