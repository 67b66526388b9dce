"""Tokenizer throughput: clipworks against OpenCLIP and transformers on 10,000 distinct captions.

Two rows: CLIP's BPE, and a Hugging Face tokenizer (a SigLIP-style T5 SentencePiece tokenizer of 8,000 pieces trained
here on generated text) read by clipworks' `HFTokenizer` and by OpenCLIP's `HFTokenizer` (transformers underneath).
"""

import gzip
import io
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from corpus import ordinary_captions  # noqa: E402

BATCH = 256
CONTEXT = 77


def _texts_per_second(tokenize: Callable[[Sequence[str]], object], texts: list[str], repeats: int) -> float:
    """Best of ``repeats`` passes over ``texts`` in batches, after one warm-up pass."""
    for i in range(0, len(texts), BATCH):
        tokenize(texts[i : i + BATCH])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(texts), BATCH):
            tokenize(texts[i : i + BATCH])
        best = min(best, time.perf_counter() - start)
    return len(texts) / best


def _transformers_tokenizer():
    """transformers' CLIP tokenizer built from the packaged vocabulary (no download).

    transformers 5.x ignores ``vocab_file=``/``merges_file=``, so the vocab and merges are passed as
    contents. ``_vocab`` is the clipworks tokenizer's id -> token list; transformers names the control
    tokens ``<|startoftext|>``/``<|endoftext|>``.
    """
    from transformers import CLIPTokenizer

    from clipworks.tokenizer import VOCAB_PATH, Tokenizer

    vocab = list(Tokenizer()._vocab)
    vocab[-2:] = ["<|startoftext|>", "<|endoftext|>"]
    with gzip.open(VOCAB_PATH) as f:
        lines = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    # The Rust BPE model wants (left, right) pairs; "left right" strings fail to convert.
    merges = [tuple(line.split()) for line in lines]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


HF_VOCAB = 8_000
HF_CONTEXT = 64


def _syllables(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("bcdfghjklmnprstvwz") + rng.choice("aeiou") + rng.choice(("", "n", "r", "s"))
                   for _ in range(n))  # fmt: skip


def _siglip_style_tokenizer(directory: Path) -> Path:
    """A T5 SentencePiece tokenizer as SigLIP's releases ship it (unigram, pad = eos = 1, no sentinels), trained on
    the benchmark's captions plus 60,000 lines of made-up words, so that its 8,000 pieces are mostly whole words."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    rng = random.Random(0)
    words = [_syllables(rng, rng.randint(1, 4)) for _ in range(20_000)]
    corpus = ordinary_captions(20_000, seed=1) + [" ".join(rng.choices(words, k=12)) for _ in range(60_000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=HF_VOCAB,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   normalization_rule_name="nmt_nfkc", minloglevel=2)  # fmt: skip
    source = directory / "spm"
    source.mkdir()
    (source / "spiece.model").write_bytes(model.getvalue())
    tok = T5Tokenizer.from_pretrained(source, extra_ids=0, legacy=False)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(directory / "tokenizer")
    return directory / "tokenizer"


def _hf_row(texts: list[str], repeats: int) -> dict:
    """clipworks' HFTokenizer against OpenCLIP's on a SigLIP-style tokenizer (canonicalize cleaning, context 64)."""
    from open_clip.tokenizer import HFTokenizer as OpenCLIPHFTokenizer

    from clipworks.hf_tokenizer import HFTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = _siglip_style_tokenizer(Path(tmp))
        ours = HFTokenizer(path, context_length=HF_CONTEXT, clean="canonicalize")
        reference = OpenCLIPHFTokenizer(str(path), context_length=HF_CONTEXT, clean="canonicalize")
        same = torch.equal(ours(texts), reference(texts))
        clipworks_tps = _texts_per_second(ours, texts, repeats)
        open_clip_tps = _texts_per_second(reference, texts, repeats)
    return {
        "task": f"HF tokenizer (T5 SentencePiece, {HF_VOCAB:,} pieces), {len(texts) // 1000}k captions",
        "unit": "texts/s",
        "clipworks": clipworks_tps,
        "open_clip": open_clip_tps,
        "transformers": None,
        "note": f"batches of {BATCH}, context {HF_CONTEXT}, clean='canonicalize', best of {repeats} after warm-up; "
        f"clipworks/open_clip {clipworks_tps / open_clip_tps:.1f}x; open_clip = its HFTokenizer over transformers' "
        "T5Tokenizer; both run the same tokenizers pipeline, single-threaded (open_clip sets "
        f"TOKENIZERS_PARALLELISM=false); ids {'identical' if same else 'DIFFER'}",
    }


def run(quick: bool = False) -> list[dict]:
    """Times the three tokenizers on the same captions (batches of 256, context 77)."""
    import open_clip

    from clipworks.tokenizer import Tokenizer

    texts = ordinary_captions(2_000 if quick else 10_000)
    repeats = 3 if quick else 5
    ours, reference = Tokenizer(), open_clip.get_tokenizer("ViT-B-32")
    notes = []

    cold = Tokenizer()
    start = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        cold(texts[i : i + BATCH])
    notes.append(f"clipworks cold first pass (empty cache) {len(texts) / (time.perf_counter() - start):,.0f} texts/s")

    expected = reference(texts)
    if not torch.equal(ours(texts), expected):
        notes.append("WARNING: clipworks ids differ from open_clip")
    clipworks_tps = _texts_per_second(ours, texts, repeats)
    open_clip_tps = _texts_per_second(reference, texts, repeats)

    transformers_tps = None
    try:
        hf = _transformers_tokenizer()
    except Exception as e:  # an optional comparison: any failure is reported, not raised
        notes.append(f"transformers left out: {type(e).__name__}: {e}")
    else:

        def hf_call(batch):
            return hf(batch, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")

        out = hf_call(texts)
        # transformers pads with <|endoftext|>, OpenCLIP with 0: compare the real tokens only.
        real = out["attention_mask"].bool()
        if torch.equal(out["input_ids"][real], expected[expected.ne(0)]) and torch.equal(real, expected.ne(0)):
            transformers_tps = _texts_per_second(hf_call, texts, repeats)
            notes.append(
                "transformers = CLIPTokenizer (in 5.x the same class as CLIPTokenizerFast, Rust-backed), "
                "single-threaded since importing open_clip sets TOKENIZERS_PARALLELISM=false"
            )
        else:
            notes.append("transformers left out: its ids differ from open_clip's")

    return [
        _hf_row(texts, repeats),
        {
            "task": f"tokenizer, {len(texts) // 1000}k captions",
            "unit": "texts/s",
            "clipworks": clipworks_tps,
            "open_clip": open_clip_tps,
            "transformers": transformers_tps,
            "note": f"batches of {BATCH}, context {CONTEXT}, best of {repeats} after warm-up; "
            f"clipworks/open_clip {clipworks_tps / open_clip_tps:.1f}x; " + "; ".join(notes),
        }
    ]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
