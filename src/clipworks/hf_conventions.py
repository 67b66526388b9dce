"""What transformers 5 makes of a release's tokenizer files, per tokenizer class, as `tokenizers` JSON.

OpenCLIP's `HFTokenizer` loads a release through `transformers.AutoTokenizer`. In transformers 5 the classes the
CLIP families use (T5, Gemma, XLM-RoBERTa, RoBERTa, NLLB) do not run tokenizer.json as written: they keep its
vocabulary (and merges, and the SentencePiece character map of its normalizer) and rebuild the model's options, the
normalizer, the pre-tokenizer, the decoder and the special-token framing in their constructors. Files written by
transformers 4 spell these differently (T5: `Strip` + `Replace(" {2,}", "▁")` normalizers and a `first`-scheme
Metaspace; NLLB: a trailing-space `Strip` ...), which changes ids on some texts (NLLB: a text ending in U+200B).
`rebuild` applies the same rebuild to the JSON, so that clipworks gives transformers 5.23's ids for those files too.
Classes not listed here are read as tokenizer.json says (what transformers does for `TokenizersBackend`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Token names each class falls back to when the configs name none (transformers' constructor defaults).
_DEFAULT_TOKENS = {
    "T5Tokenizer": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "SiglipTokenizer": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"},
    "GemmaTokenizer": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
                       "mask_token": "<mask>"},
    "XLMRobertaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                            "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"},
}  # fmt: skip
_DEFAULT_TOKENS["RobertaTokenizer"] = _DEFAULT_TOKENS["NllbTokenizer"] = _DEFAULT_TOKENS["XLMRobertaTokenizer"]
# transformers 5 names mT5's and the fast variants' classes after the same constructor.
_ALIASES = {"MT5Tokenizer": "T5Tokenizer", "UMT5Tokenizer": "T5Tokenizer"}
_WHITESPACE_SPLIT = {"type": "WhitespaceSplit"}


def class_name(config: dict[str, Any]) -> str | None:
    """The transformers class a tokenizer_config.json names, without the "Fast" suffix (None when it names none)."""
    name = config.get("tokenizer_class")
    if not isinstance(name, str):
        return None
    name = name.removesuffix("Fast")
    return _ALIASES.get(name, name)


def special_tokens(config: dict[str, Any], special_map: dict[str, Any]) -> dict[str, str]:
    """The special tokens' strings (bos_token, eos_token, ...), as transformers 5 reads them.

    Its `from_pretrained` takes them from tokenizer_config.json, and from special_tokens_map.json (which then wins)
    only when the config predates `added_tokens_decoder`; missing ones take the class's defaults.
    """
    merged = dict(config)
    if "added_tokens_decoder" not in config:
        merged.update(special_map)
    tokens = dict(_DEFAULT_TOKENS.get(class_name(config) or "", {}))
    for key in SPECIAL_TOKEN_KEYS:
        value = merged.get(key)
        if isinstance(value, dict):  # a serialized AddedToken
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
        elif key in merged and value is None:
            tokens.pop(key, None)
    return tokens


@dataclass(frozen=True)
class Framing:
    """How a tokenizer frames and pads a text's ids, by token strings.

    Attributes:
        prefix: tokens before the text ids (XLM-R's "<s>", NLLB's language code).
        suffix: tokens after them (the end token).
        pad_left: padding goes before the tokens (Gemma's class default) rather than after.
        truncate_left: a long text keeps its last ids rather than its first.
        from_file: the framing is the file's post-processor's, to be read off the built tokenizer (prefix and
            suffix are then empty).
    """

    prefix: tuple[str, ...] = ()
    suffix: tuple[str, ...] = ()
    pad_left: bool = False
    truncate_left: bool = False
    from_file: bool = False


def _precompiled(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The SentencePiece character map normalizer of tokenizer.json (top level or in a Sequence), if any."""
    normalizer = spec.get("normalizer") or {}
    parts = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    return next((n for n in parts if n.get("type") == "Precompiled" and "precompiled_charsmap" in n), None)


def _metaspace(scheme: str) -> dict[str, Any]:
    return {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme, "split": True}


def _bpe(model: dict[str, Any], **options) -> dict[str, Any]:
    base = {"dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}  # fmt: skip
    return {**model, **base, **options}


def _t5(spec, config, tokens):
    spec["model"] = {**spec["model"], "unk_id": 2, "byte_fallback": False}
    spec["normalizer"] = _precompiled(spec)
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [_WHITESPACE_SPLIT, _metaspace("always")]}
    spec["decoder"] = _metaspace("always")


def _xlm_roberta(spec, config, tokens):
    scheme = "always" if config.get("add_prefix_space", True) else "never"
    spec["model"] = {**spec["model"], "unk_id": 3, "byte_fallback": False}
    spec["normalizer"] = _precompiled(spec)
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [_WHITESPACE_SPLIT, _metaspace(scheme)]}
    spec["decoder"] = _metaspace(scheme)


def _gemma(spec, config, tokens):
    spec["model"] = _bpe(spec["model"], unk_token=tokens["unk_token"], fuse_unk=True, byte_fallback=True)
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    spec["pre_tokenizer"] = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                             "invert": False}  # fmt: skip
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}
    ]}  # fmt: skip


def _roberta(spec, config, tokens):
    byte_level = {"type": "ByteLevel", "add_prefix_space": bool(config.get("add_prefix_space", False)),
                  "trim_offsets": True, "use_regex": True}  # fmt: skip
    spec["model"] = _bpe(spec["model"], continuing_subword_prefix="", end_of_word_suffix="")
    spec["normalizer"] = None
    spec["pre_tokenizer"] = byte_level
    spec["decoder"] = {**byte_level, "add_prefix_space": True}


def _nllb(spec, config, tokens):
    charsmap = _precompiled(spec)
    spec["model"] = _bpe(spec["model"], unk_token=tokens["unk_token"], fuse_unk=True)
    spec["normalizer"] = charsmap and {"type": "Sequence", "normalizers": [
        charsmap, {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}
    ]}  # fmt: skip
    spec["pre_tokenizer"] = spec["decoder"] = _metaspace("always")


# Per class: the model type its constructor builds, the special tokens it needs, and how it rebuilds tokenizer.json.
_CLASSES = {
    "T5Tokenizer": ("Unigram", ("eos_token",), _t5),
    "XLMRobertaTokenizer": ("Unigram", ("bos_token", "eos_token"), _xlm_roberta),
    "GemmaTokenizer": ("BPE", ("unk_token",), _gemma),
    "RobertaTokenizer": ("BPE", ("cls_token", "sep_token"), _roberta),
    "NllbTokenizer": ("BPE", ("eos_token", "unk_token"), _nllb),
}


def rebuild(spec: dict[str, Any], config: dict[str, Any], tokens: dict[str, str]) -> str | None:
    """Rewrite tokenizer.json's dict `spec` in place as transformers 5's class for `config` builds it.

    A class whose model type differs from the file's (an NLLB file with a unigram model) keeps the file's pipeline:
    transformers would build a merge-less BPE from a unigram vocabulary, which no release was trained with.

    Returns:
        The class whose rules were applied, for `framing`; None when the file is read as written.

    Raises:
        ValueError: the configs leave out a special token the class needs.
    """
    name = class_name(config)
    model_type, required, build = _CLASSES.get(name, (None, (), None))
    spec["truncation"] = spec["padding"] = None  # clipworks truncates and pads itself
    if build is None or (spec.get("model") or {}).get("type") != model_type:
        return None
    missing = [key for key in required if key not in tokens]
    if missing:
        raise ValueError(f"a {name} needs {' and '.join(missing)}, which its tokenizer_config.json sets to null")
    build(spec, config, tokens)
    return name


def default_language(config: dict[str, Any]) -> str:
    """The source language NLLB prefixes when none is asked for."""
    return config.get("src_lang") or "eng_Latn"


def framing(rebuilt: str | None, config: dict[str, Any], tokens: dict[str, str], language: str | None) -> Framing:
    """The framing of texts by the class `rebuild` applied (None: the file's), with `language` for NLLB."""
    pad_left = config.get("padding_side", "left" if rebuilt == "GemmaTokenizer" else "right") == "left"
    truncate_left = config.get("truncation_side", "right") == "left"
    if rebuilt == "T5Tokenizer":
        prefix, suffix = (), (tokens["eos_token"],)
    elif rebuilt == "XLMRobertaTokenizer":
        prefix, suffix = (tokens["bos_token"],), (tokens["eos_token"],)
    elif rebuilt == "RobertaTokenizer":
        prefix, suffix = (tokens["cls_token"],), (tokens["sep_token"],)
    elif rebuilt == "NllbTokenizer":
        language = language or default_language(config)
        legacy = config.get("legacy_behaviour", False)
        prefix, suffix = ((), (tokens["eos_token"], language)) if legacy else ((language,), (tokens["eos_token"],))
    else:
        # Gemma's and other classes: tokenizer.json's post-processor (transformers 5 drops tokenizer_config.json's
        # add_bos_token / add_eos_token when a tokenizer.json is there)
        return Framing(pad_left=pad_left, truncate_left=truncate_left, from_file=True)
    return Framing(prefix, suffix, pad_left, truncate_left)
