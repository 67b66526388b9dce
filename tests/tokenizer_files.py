"""Tokenizer directories built offline the way the releases were made, for the HF tokenizer tests.

Each builder trains a tiny model (SentencePiece unigram or BPE, or a byte-level BPE with `tokenizers`) on a small
generated multilingual corpus, wraps it in transformers' own tokenizer class with the options the release used,
and writes it with `save_pretrained`:

* SigLIP (English and i18n): T5's unigram SentencePiece, `T5Tokenizer(extra_ids=0, legacy=False)` with the padding
  token set to the end token, as OpenCLIP's `SigLipTokenizer` saved it.
* SigLIP 2: Gemma's byte-fallback BPE, `GemmaTokenizer(add_bos_token=False, add_eos_token=True)`, padded on the right.
* XLM-R / XLM-V (MetaCLIP 2): fairseq's unigram SentencePiece in `XLMRobertaTokenizer`.
* RoBERTa: a byte-level BPE in `RobertaTokenizer`.
* NLLB: fairseq's SentencePiece in `NllbTokenizer` with a few language codes. A BPE model, not a unigram one:
  transformers 5's `NllbTokenizer` builds a BPE model from whatever the file holds (a unigram vocabulary gets
  generated merges and is cut into characters), so a unigram fixture would test a pipeline no release runs.
* mT5: only spiece.model and tokenizer_config.json, as google/mt5-base ships (no tokenizer.json).
* BERT (CLIPA): an uncased WordPiece in `BertTokenizer`.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

WORDS = (
    "a the dog cat man woman child bird car tree house bridge table chair phone pizza cake umbrella kite guitar "
    "running sitting standing walking jumping sleeping eating playing riding on in near under beside behind at "
    "black white red blue green yellow small large old young happy wet shiny wooden beach street park kitchen "
    "photo picture image of with and two three people sunset night morning rain snow city forest mountain"
).split()
FOREIGN = (
    "café naïve résumé über straße jalapeño façade Привет мир собака кошка 日本語 東京 犬 猫 写真 中文 北京 "
    "مرحبا بالعالم كلب قطة 안녕하세요 세계 γεια κόσμος σκύλος नमस्ते दुनिया สวัสดี 😀 🐶 🐱 🌅 ½ ¼ ① ﬁ ™ … – —"
).split()
NLLB_LANGUAGES = ("eng_Latn", "fra_Latn", "deu_Latn", "zho_Hans", "arb_Arab")


def training_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """`n` short sentences, mostly English caption words with foreign words, numbers and punctuation mixed in."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        for _ in range(rng.randint(0, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(FOREIGN))
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 2024)))
        text = " ".join(words)
        if rng.random() < 0.3:
            text = text.capitalize()
        lines.append(text + rng.choice(("", ".", "!", "?", ",")))
    return lines


def train_sentencepiece(model_type: str, vocab_size: int, corpus: list[str] | None = None, **options) -> bytes:
    """A serialized SentencePiece model trained in memory (`options` go to the trainer: ids, normalization, ...)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus or training_corpus()), model_writer=out, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, minloglevel=2, **options,
    )  # fmt: skip
    return out.getvalue()


def _with_model(tmp: Path, filename: str, model: bytes) -> Path:
    src = tmp / "spm-source"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    (src / filename).write_bytes(model)
    return src


def _save(tokenizer, out: Path, tmp: Path) -> Path:
    tokenizer.save_pretrained(out)
    shutil.rmtree(tmp / "spm-source", ignore_errors=True)
    return out


def build_siglip(out: Path, vocab_size: int = 400) -> Path:
    """SigLIP's T5-style tokenizer: unigram SentencePiece with pad 0, eos 1, unk 2; pad set to eos (id 1)."""
    from transformers import T5Tokenizer

    model = train_sentencepiece("unigram", vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                normalization_rule_name="nmt_nfkc")  # fmt: skip
    src = _with_model(out.parent, "spiece.model", model)
    tok = T5Tokenizer.from_pretrained(src, extra_ids=0, legacy=False)
    tok.pad_token = tok.eos_token
    return _save(tok, out, out.parent)


def build_gemma(out: Path, vocab_size: int = 500) -> Path:
    """SigLIP 2's Gemma tokenizer: byte-fallback BPE (pad 0, eos 1, bos 2, unk 3), no dummy prefix, digits split."""
    from transformers import GemmaTokenizer

    model = train_sentencepiece(
        "bpe", vocab_size, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", user_defined_symbols=["<mask>", "<table>"], byte_fallback=True, split_digits=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
    )  # fmt: skip
    src = _with_model(out.parent, "tokenizer.model", model)
    tok = GemmaTokenizer.from_pretrained(src, add_bos_token=False, add_eos_token=True, padding_side="right")
    return _save(tok, out, out.parent)


def build_xlm_roberta(out: Path, vocab_size: int = 400) -> Path:
    """XLM-R / XLM-V: fairseq's unigram SentencePiece (unk 0, bos 1, eos 2), remapped to <s> 0, <pad> 1, </s> 2."""
    from transformers import XLMRobertaTokenizer

    model = train_sentencepiece("unigram", vocab_size, normalization_rule_name="nmt_nfkc")
    src = _with_model(out.parent, "sentencepiece.bpe.model", model)
    return _save(XLMRobertaTokenizer.from_pretrained(src), out, out.parent)


def build_nllb(out: Path, vocab_size: int = 400, model_type: str = "bpe") -> Path:
    """NLLB: fairseq's SentencePiece (unk 0, bos 1, eos 2; BPE, see the module docstring) and language codes as
    special tokens."""
    from transformers import NllbTokenizer

    model = train_sentencepiece(model_type, vocab_size, normalization_rule_name="nmt_nfkc")
    src = _with_model(out.parent, "sentencepiece.bpe.model", model)
    tok = NllbTokenizer.from_pretrained(src, additional_special_tokens=list(NLLB_LANGUAGES))
    return _save(tok, out, out.parent)


def build_roberta(out: Path, vocab_size: int = 500) -> Path:
    """RoBERTa: a byte-level BPE trained with `tokenizers`, wrapped in `RobertaTokenizer`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(training_corpus(), vocab_size=vocab_size, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # fmt: skip
    src = out.parent / "bpe-source"
    src.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(src))
    tok = RobertaTokenizer.from_pretrained(src)
    tok.save_pretrained(out)
    shutil.rmtree(src)
    return out


def build_bert(out: Path, vocab_size: int = 500) -> Path:
    """CLIPA's bert-base-uncased: a lower-casing WordPiece trained with `tokenizers`, wrapped in `BertTokenizer`
    ([CLS] text [SEP], [PAD] = 0)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(training_corpus(), vocab_size=vocab_size, min_frequency=2, show_progress=False)
    src = out.parent / "wordpiece-source"
    src.mkdir(parents=True, exist_ok=True)
    wordpiece.save_model(str(src))
    BertTokenizer.from_pretrained(src).save_pretrained(out)
    shutil.rmtree(src)
    return out


def build_mt5(out: Path, vocab_size: int = 400) -> Path:
    """mT5 as google/mt5-base ships it: spiece.model and tokenizer_config.json only (no tokenizer.json)."""
    model = train_sentencepiece("unigram", vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                normalization_rule_name="nmt_nfkc")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "spiece.model").write_bytes(model)
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
              "extra_ids": 0, "additional_special_tokens": None}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


BUILDERS = {
    "siglip": build_siglip,
    "gemma": build_gemma,
    "xlm_roberta": build_xlm_roberta,
    "nllb": build_nllb,
    "roberta": build_roberta,
    "mt5": build_mt5,
    "bert": build_bert,
}
