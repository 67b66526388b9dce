"""Tokenizer throughput: clipworks against OpenCLIP and transformers on 10,000 distinct captions."""

import gzip
import sys
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
