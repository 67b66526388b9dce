"""Tokenizers read from a release's own files with the Hugging Face `tokenizers` library, with OpenCLIP's ids.

SigLIP (T5's SentencePiece, English and multilingual), SigLIP 2 (Gemma's BPE), MetaCLIP 2 (XLM-V, mT5) and the
Hugging Face text towers (RoBERTa, XLM-R, mT5, NLLB) tokenize with their releases' files. `HFTokenizer` reads them
as OpenCLIP's `HFTokenizer` does through transformers 5 (`hf_conventions` has what its classes rebuild), and gives
the same ids for every text, with the same conventions: OpenCLIP's text cleaning ("lower", "canonicalize",
"whitespace"), the class's framing (T5: text then "</s>"; XLM-R: "<s>" text "</s>"; NLLB: language code first),
padding to the context length with the pad id, and truncation that keeps the framing tokens.

One deliberate difference, as in clipworks' CLIP tokenizer: a special token's string inside a caption ("</s>",
"<pad>", "eng_Latn", ...) is ordinary text, never a control token. transformers splits such strings out as special
tokens; here they are tokenized like any other text (`tokenizers`' `encode_special_tokens`), and SentencePiece
unigram vocabularies, which would still match their control pieces, have those pieces hidden from the model.

A directory with no tokenizer.json but a T5-style SentencePiece model (spiece.model; google/mt5-base ships only
that) is read with the `sentencepiece` library, whose ids are transformers' for those models.

Two things make it fast: the ftfy/HTML repair runs only on texts it can change (`tokenizer.needs_fixing`), and a
batch is encoded in one `encode_batch` call and framed in one numpy array.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
import shutil
import string
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ftfy

from . import hf_conventions
from .config import TEXT_CLEANING, CLIPConfig, TokenizerConfig
from .hf_encoders import JSONEncoder, SentencePieceEncoder
from .hub import SENTENCEPIECE_FILES  # the files download_tokenizer fetches; hub imports huggingface_hub lazily
from .tokenizer import (
    TextTokenizer, TokenizedText, as_texts, check_context_length, clean_up_spaces, ids_list, needs_fixing, pack,
)  # fmt: skip

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
DEFAULT_CONTEXT_LENGTH = 77  # OpenCLIP's, for a tokenizer whose config gives no usable model_max_length
# SentencePiece models whose piece ids are the token ids (no fairseq offset as in XLM-R's and NLLB's).
_SENTENCEPIECE_CLASSES = (None, "T5Tokenizer", "SiglipTokenizer")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_LANGUAGE_CODE = re.compile(r"[a-z]{3}_[A-Z][a-z]{3}")  # NLLB's (FLORES-200) codes: eng_Latn


def clean(text: str, mode: str) -> str:
    """OpenCLIP's `get_clean_fn(mode)(text)`: ftfy and HTML unescaping twice, then whitespace collapsed, and
    for "lower" lower case, for "canonicalize" underscores to spaces, ASCII punctuation removed and lower case."""
    if needs_fixing(text):  # otherwise ftfy and unescaping could only change whitespace, collapsed below
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    text = " ".join(text.split())
    return text.lower() if mode == "lower" else text


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class _Files:
    """A directory's tokenizer, read once: the encoder and what its configs say."""

    encoder: JSONEncoder | SentencePieceEncoder
    config: dict[str, Any]
    tokens: dict[str, str]
    rebuilt: str | None  # the transformers class whose conventions apply, None for the file's own


def _stamp(directory: Path) -> tuple:
    """What identifies a directory's tokenizer files: names, sizes and modification times."""
    names = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, *SENTENCEPIECE_FILES)
    return tuple((n, s.st_size, s.st_mtime_ns) for n in names if (p := directory / n).is_file() and (s := p.stat()))


@functools.lru_cache(maxsize=4)  # a 900k-token vocabulary takes a few hundred MB: keep few
def _load_files(directory: str, stamp: tuple) -> _Files:
    path = Path(directory)
    config = _read_json(path / TOKENIZER_CONFIG)
    tokens = hf_conventions.special_tokens(config, _read_json(path / SPECIAL_TOKENS_MAP))
    if (path / TOKENIZER_JSON).is_file():
        spec = _read_json(path / TOKENIZER_JSON)
        rebuilt = hf_conventions.rebuild(spec, config, tokens)

        def reread() -> dict[str, Any]:  # for the rare second tokenizer: the spec is not kept in memory
            again = _read_json(path / TOKENIZER_JSON)
            hf_conventions.rebuild(again, config, tokens)
            return again

        return _Files(JSONEncoder(spec, reread), config, tokens, rebuilt)
    name = hf_conventions.class_name(config)
    spm = next((path / n for n in SENTENCEPIECE_FILES if (path / n).is_file()), None)
    if spm is None:
        raise FileNotFoundError(missing_files_message(f"in {path}"))
    if name not in _SENTENCEPIECE_CLASSES:
        raise ValueError(f"{path} has a SentencePiece model but no {TOKENIZER_JSON}; clipworks reads those of T5-style "
                         f"tokenizers only (T5Tokenizer, SiglipTokenizer), and this one is a {name}")  # fmt: skip
    extra_ids = int(config.get("extra_ids", 100 if name == "T5Tokenizer" else 0) or 0)
    tokens = hf_conventions.special_tokens({"tokenizer_class": "T5Tokenizer", **config},
                                           _read_json(path / SPECIAL_TOKENS_MAP))  # fmt: skip
    return _Files(SentencePieceEncoder(spm, extra_ids), config, tokens, "T5Tokenizer")


def missing_files_message(where: str) -> str:
    return f"no {TOKENIZER_JSON} and no SentencePiece model ({', '.join(SENTENCEPIECE_FILES)}) {where}"


def has_tokenizer_files(path: Path) -> bool:
    """Whether a directory holds a tokenizer `HFTokenizer` can read (tokenizer.json or a SentencePiece model)."""
    return any((path / n).is_file() for n in (TOKENIZER_JSON, *SENTENCEPIECE_FILES))


class HFTokenizer(TextTokenizer):
    """A release's own tokenizer, giving the ids of OpenCLIP's `HFTokenizer(path, context_length, clean=clean)`.

    Calling it returns the (B, context_length) id tensor: each text cleaned, framed by the class's special tokens,
    truncated so that they stay, and padded with the pad id. Special-token strings in a text are ordinary text.

    Args:
        path: a directory with tokenizer.json (and tokenizer_config.json / special_tokens_map.json), or a T5-style
            SentencePiece model.
        context_length: default tokens per text, framing included; None for the config's model_max_length when it
            is a usable length, else 77.
        clean: OpenCLIP's text cleaning: "lower", "canonicalize" or "whitespace".
        language: NLLB's source-language code (default: the config's src_lang, else "eng_Latn").
        strip_sep_token: replace the separator token (BERT's "[SEP]") by id 0, as OpenCLIP's option of that name
            does (CLIPA); it is then not counted in `tokenize`'s lengths and mask.
    """

    def __init__(self, path: str | os.PathLike, context_length: int | None = None, clean: str = "whitespace",
                 language: str | None = None, strip_sep_token: bool = False):  # fmt: skip
        if clean not in TEXT_CLEANING:
            raise ValueError(f"unknown text cleaning {clean!r}; expected one of {TEXT_CLEANING}")
        self.path, self.clean = Path(path), clean
        files = _load_files(str(self.path.resolve()), _stamp(self.path))
        self._encoder = files.encoder
        self.vocab_size = files.encoder.vocab_size
        nllb = files.rebuilt == "NllbTokenizer"
        if language is not None and not nllb:
            raise ValueError(f"language={language!r}: only NLLB tokenizers take a language; {path} has a "
                             f"{hf_conventions.class_name(files.config) or 'tokenizer with no class'}")  # fmt: skip
        self.language = language or (hf_conventions.default_language(files.config) if nllb else None)
        framing = hf_conventions.framing(files.rebuilt, files.config, files.tokens, self.language)
        if framing.from_file:
            self._prefix, self._suffix = files.encoder.file_framing()
        else:
            self._prefix, self._suffix = self._ids(framing.prefix, files), self._ids(framing.suffix, files)
        self._pad_left, self._truncate_left = framing.pad_left, framing.truncate_left
        if "pad_token" not in files.tokens:
            raise ValueError(f"{path}: the tokenizer has no padding token (pad_token in {TOKENIZER_CONFIG})")
        self.pad_token_id = self._ids((files.tokens["pad_token"],), files)[0]
        self._strip_id = None
        if strip_sep_token:
            if "sep_token" not in files.tokens:
                raise ValueError(f"strip_sep_token=True, but {path} has no separator token (sep_token)")
            self._strip_id = self._ids((files.tokens["sep_token"],), files)[0]
        self.sot_token_id = self._prefix[0] if self._prefix else None
        self.eot_token_id = self._suffix[0] if self._suffix else None
        limit = files.config.get("model_max_length")
        if context_length is None:
            usable = isinstance(limit, int) and self._min_length <= limit <= 100_000
            context_length = limit if usable else DEFAULT_CONTEXT_LENGTH
        self.context_length = self._check_length(context_length)

    @property
    def _min_length(self) -> int:
        return max(1, len(self._prefix) + len(self._suffix))

    def _ids(self, tokens: tuple[str, ...], files: _Files) -> tuple[int, ...]:
        if self.language in tokens and self.language not in files.encoder.special_tokens:
            codes = sorted(t for t in files.encoder.special_tokens if _LANGUAGE_CODE.fullmatch(t))
            more = f" and {len(codes) - 20} more" if len(codes) > 20 else ""
            raise ValueError(f"unknown language {self.language!r}; this tokenizer's languages: {codes[:20]}{more}")
        ids = tuple(files.encoder.token_id(t) for t in tokens)
        missing = [t for t, i in zip(tokens, ids) if i is None]
        if missing:
            raise ValueError(f"{self.path}: the special tokens {missing} are not in the vocabulary")
        return ids

    def _check_length(self, context_length: int) -> int:
        return check_context_length(context_length, self._min_length, "the special tokens that frame every text")

    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None) -> TokenizedText:
        """Tokenizes text(s) to ids, lengths (real tokens, special ones included) and an attention mask.

        Args:
            texts: one text or a sequence of texts.
            context_length: tokens per text, framing included; None for `self.context_length`.
        """
        texts = as_texts(texts)
        length = self.context_length if context_length is None else self._check_length(context_length)
        room = length - len(self._prefix) - len(self._suffix)
        rows = self._encoder.encode_batch([clean(t, self.clean) for t in texts])
        if self._truncate_left:
            rows = [r if len(r) <= room else r[len(r) - room :] for r in rows]
        else:
            rows = [r if len(r) <= room else r[:room] for r in rows]
        out = pack(rows, length, self._prefix, self._suffix, self.pad_token_id, self._pad_left)
        if self._strip_id is None:
            return out
        sep = out.ids == self._strip_id  # (B, L); text never yields it: special-token strings are text here
        mask = out.attention_mask & ~sep
        return TokenizedText(out.ids.masked_fill(sep, 0), mask.sum(dim=1), mask)

    def encode(self, text: str) -> list[int]:
        """Token ids of the cleaned `text`, without the framing tokens and untruncated."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._encoder.encode_batch([clean(text, self.clean)])[0]

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        """Text of a sequence of ids (a list or a 1-D tensor/array), as the release's decoder spells it.

        Args:
            ids: token ids.
            skip_special_tokens: leave out special tokens (framing and padding).
            clean_up_tokenization_spaces: remove the spaces before punctuation (`tokenizer.clean_up_spaces`).
        """
        ids = ids_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        text = self._encoder.decode(ids, skip_special_tokens)
        return clean_up_spaces(text) if clean_up_tokenization_spaces else text

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, context_length={self.context_length}, clean={self.clean!r})"


# Hub repositories resolved in this process, by (repository, hub cache): repeated get_tokenizer calls stay offline.
_HUB_DIRS: dict[tuple, Path] = {}


def tokenizer_dir(source: str | None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the tokenizer files `source` names: a local directory, else a hub repository id whose
    tokenizer files are downloaded (`hub.download_tokenizer`).

    Raises:
        FileNotFoundError: a directory without tokenizer files, or a path that is no directory (both named).
        HubUnavailableError: offline (or unreachable) and the repository's tokenizer is not cached.
    """
    if source is None:
        raise ValueError("an 'hf' tokenizer config needs a source: a directory or a hub repository id")
    path = Path(source).expanduser()
    if path.is_dir():
        if not has_tokenizer_files(path):
            raise FileNotFoundError(missing_files_message(f"in {path}"))
        return path
    if not _REPO_ID.fullmatch(source) or source.count("/") > 1:
        raise FileNotFoundError(f"tokenizer source {source!r} is neither a directory nor a hub repository id")
    from .hub import download_tokenizer

    key = (source, cache_dir, os.environ.get("HF_HUB_CACHE"), os.environ.get("HF_HOME"), os.environ.get("HF_ENDPOINT"))
    cached = _HUB_DIRS.get(key)
    if cached is None or not has_tokenizer_files(cached):
        cached = _HUB_DIRS[key] = download_tokenizer(source, cache_dir=cache_dir)
    return cached


@functools.lru_cache(maxsize=16)
def _cached_tokenizer(directory: str, stamp: tuple, clean: str, context_length: int, language: str | None,
                      strip_sep_token: bool):  # fmt: skip
    return HFTokenizer(directory, context_length, clean, language, strip_sep_token)


def load_hf_tokenizer(cfg: TokenizerConfig, context_length: int | None = None, language: str | None = None,
                      cache_dir: str | os.PathLike | None = None):  # fmt: skip
    """The `HFTokenizer` a kind="hf" config describes, built once per (files, settings) and shared."""
    directory = tokenizer_dir(cfg.source, cache_dir)
    context = cfg.context_length if context_length is None else context_length
    return _cached_tokenizer(str(directory), _stamp(directory), cfg.clean, context, language or cfg.language,
                             cfg.strip_sep_token)  # fmt: skip


def save_tokenizer_files(tokenizer_config: TokenizerConfig, dest_dir: str | os.PathLike) -> list[Path]:
    """Copy the tokenizer files of `tokenizer_config` into `dest_dir`; returns the files written (none for CLIP's
    built-in BPE). A SentencePiece-only tokenizer whose tokenizer_config.json names no class gets "T5Tokenizer"
    written into the copy, the class clipworks reads it as, so that transformers reads it the same way."""
    if tokenizer_config.kind != "hf":
        return []
    src, dest = tokenizer_dir(tokenizer_config.source), Path(dest_dir)
    if (src / TOKENIZER_JSON).is_file():
        names = [TOKENIZER_JSON]
    else:
        names = [n for n in SENTENCEPIECE_FILES if (src / n).is_file()]
    written = []
    for name in [*names, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP]:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)  # follows the hub cache's links
            written.append(dest / name)
    config = _read_json(src / TOKENIZER_CONFIG)
    if names[0] != TOKENIZER_JSON and hf_conventions.class_name(config) is None:
        (dest / TOKENIZER_CONFIG).write_text(json.dumps({**config, "tokenizer_class": "T5Tokenizer"}, indent=2))
        written += [] if dest / TOKENIZER_CONFIG in written else [dest / TOKENIZER_CONFIG]
    return written


def copy_tokenizer_files(tokenizer_config: TokenizerConfig, dest_dir: str | os.PathLike) -> TokenizerConfig:
    """`save_tokenizer_files`, returning the config to record beside them: a Hugging Face tokenizer's with source
    None (the files in `dest_dir`). When its files cannot be found (offline with nothing cached, a directory gone),
    nothing is copied, a warning says so, and the config is returned as it is, naming its source."""
    try:
        save_tokenizer_files(tokenizer_config, dest_dir)
    except OSError as e:
        warnings.warn(f"the tokenizer's files were not copied ({e}); the checkpoint names their source "
                      f"{tokenizer_config.source!r} instead", stacklevel=3)  # fmt: skip
        return tokenizer_config
    return replace(tokenizer_config, source=None) if tokenizer_config.kind == "hf" else tokenizer_config


def tokenizer_config_of_dir(path: Path, cfg: CLIPConfig, hub_repo: str | None = None) -> TokenizerConfig:
    """The tokenizer a checkpoint directory's text tower was trained with, as its config names it.

    clipworks directories: config.json's "tokenizer" ("clip", or a TokenizerConfig dict whose source None means
    the files beside the weights). OpenCLIP directories: text_cfg's hf_tokenizer_name / tokenizer_kwargs /
    context_length, with the files taken from the directory if it has them, else from `hub_repo` (the repository an
    hf-hub: load came from) if that has them, else from hf_tokenizer_name. transformers directories: CLIP models
    (and their text-only class) use the CLIP BPE, SigLIP / SigLIP 2 models their own files with SigLIP's cleaning.
    Anything else: the CLIP BPE.
    """
    from .checkpoints.native import is_clipworks_dir
    from .checkpoints.open_clip_dir import CONFIG_FILE, is_open_clip_dir, tokenizer_from_open_clip

    path = Path(path)
    default = TokenizerConfig(context_length=cfg.text.context_length) if cfg.text is not None else TokenizerConfig()
    if is_clipworks_dir(path):
        saved = _read_json(path / "config.json").get("tokenizer", "clip")
        if saved == "clip":
            return default
        if not isinstance(saved, dict):
            raise ValueError(f"{path / 'config.json'}: 'tokenizer' must be \"clip\" or a TokenizerConfig object")
        tok = TokenizerConfig.from_dict(saved)
        if tok.kind != "hf" or tok.source is not None:
            return tok
        return replace(tok, source=_files_source(path, hub_repo, str(path)))  # None: the files beside the weights
    if is_open_clip_dir(path):
        tok = tokenizer_from_open_clip(_read_json(path / CONFIG_FILE)["model_cfg"])
        return replace(tok, source=_files_source(path, hub_repo, tok.source)) if tok.kind == "hf" else tok
    hf_config = _read_json(path / "config.json")
    model_type = str(hf_config.get("model_type", ""))  # "clip", or a one-tower model's "clip_text_model"
    text_config = hf_config if model_type.endswith("_text_model") else hf_config.get("text_config") or {}
    family = model_type.removesuffix("_text_model")
    if family == "clip":
        return TokenizerConfig(context_length=text_config.get("max_position_embeddings", 77))
    if family in ("siglip", "siglip2"):
        return TokenizerConfig(kind="hf", source=_files_source(path, hub_repo, hub_repo), clean="canonicalize",
                               context_length=text_config.get("max_position_embeddings", 64))  # fmt: skip
    return default


def _files_source(path: Path, hub_repo: str | None, fallback: str | None) -> str | None:
    if has_tokenizer_files(path):
        return str(path)
    if hub_repo is not None:
        from .hub import repo_has_tokenizer

        if repo_has_tokenizer(hub_repo):  # None when offline with nothing cached: try the fallback
            return hub_repo
    return fallback if fallback is not None else str(path)
