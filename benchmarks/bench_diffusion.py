"""SDXL prompt-encoding latency on the CPU: clipworks' `SDXLText` against diffusers' `encode_prompt`.

Both encode the same prompts with the same random weights: the CLIP ViT-L/14 text tower and OpenCLIP's bigG/14
text tower at full size by default (about 0.8 B parameters together; building them takes a while and ~7 GB of
memory). Each call encodes one prompt and one negative prompt, as a sampler does once per image.

Usage: python benchmarks/bench_diffusion.py [--tiny] [--repeats 5] [--prompts 6] [--threads N]
                                            [--width1 768 --layers1 12 --heads1 12]
                                            [--width2 1280 --layers2 32 --heads2 20 --embed2 1280]
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon, highly detailed, 8k",
    "an oil painting of a lighthouse at dusk, stormy sea, dramatic lighting",
    "a cozy cabin in a snowy forest at night, warm light in the windows",
    "portrait of an old fisherman, wrinkles, natural light, 85mm lens",
    "a bowl of ramen, steam rising, studio photo",
    "isometric pixel art of a small city block with shops and trees",
]
NEGATIVE = "blurry, low quality, watermark, text"
TINY = dict(width1=32, layers1=3, heads1=2, width2=48, layers2=4, heads2=2, embed2=24)


def hf_tokenizer(pad: str):
    """transformers' CLIPTokenizer on clipworks' shipped vocabulary (nothing downloaded)."""
    from transformers import CLIPTokenizer

    from clipworks.tokenizer import _NUM_MERGES, VOCAB_PATH, default_tokenizer

    vocab = default_tokenizer()._vocab[:-2] + ["<|startoftext|>", "<|endoftext|>"]
    with gzip.open(VOCAB_PATH) as f:
        merges = [tuple(line.split()) for line in f.read().decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, pad_token=pad, model_max_length=77)


def build_encoders(args):
    """SDXL's two text encoders with random weights: ViT-L/14 text (quick_gelu) and bigG/14 text (gelu)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(width, layers, heads, act, embed):
        return CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                              num_attention_heads=heads, hidden_act=act, projection_dim=embed)  # fmt: skip

    torch.manual_seed(0)
    enc = CLIPTextModel(config(args.width1, args.layers1, args.heads1, "quick_gelu", args.width1)).eval()
    enc_2 = CLIPTextModelWithProjection(config(args.width2, args.layers2, args.heads2, "gelu", args.embed2)).eval()
    return enc, enc_2


def race(fns: dict[str, Callable[[str], object]], prompts: list[str], repeats: int) -> dict[str, list[float]]:
    """Milliseconds per prompt of each timed pass over `prompts`, for each function, after one warm-up call
    each. The contenders take turns pass by pass, so a machine that slows down mid-run slows all of them."""
    for fn in fns.values():
        fn(prompts[0])
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for p in prompts:
                fn(p)
            times[name].append((time.perf_counter() - t) * 1000 / len(prompts))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny encoders, to check the script runs")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the prompts")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"prompts per pass (1-{len(PROMPTS)})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    for name, default in [("width1", 768), ("layers1", 12), ("heads1", 12), ("width2", 1280), ("layers2", 32),
                          ("heads2", 20), ("embed2", 1280)]:  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be between 1 and {len(PROMPTS)}")
    prompts = PROMPTS[: args.prompts]
    if args.tiny:
        vars(args).update(TINY)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers

    from clipworks.conditioning import ClipSkip, PromptReader, SDXLText, text_encoder_from_transformers

    t = time.perf_counter()
    enc, enc_2 = build_encoders(args)
    pipe = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=enc, text_encoder_2=enc_2, unet=None,
                                               tokenizer=hf_tokenizer("<|endoftext|>"), tokenizer_2=hf_tokenizer("!"),
                                               scheduler=None)  # fmt: skip
    ours = SDXLText(text_encoder_from_transformers(enc), text_encoder_from_transformers(enc_2),
                    PromptReader(syntax="plain", truncate=True))  # fmt: skip
    ours_a1111 = SDXLText(ours.encoders[0], ours.encoders[1])
    print(f"built encoders in {time.perf_counter() - t:.1f} s; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {platform.machine()}, fp32")  # fmt: skip

    with torch.inference_mode():
        ref = pipe.encode_prompt(PROMPTS[0], device="cpu", negative_prompt=NEGATIVE)
        got = ours(PROMPTS[0], NEGATIVE, layer=ClipSkip.sdxl())
        diff = max((a - b).abs().max().item() for a, b in zip(got, ref))
        contenders = {
            "diffusers encode_prompt": lambda p: pipe.encode_prompt(p, device="cpu", negative_prompt=NEGATIVE),
            "clipworks SDXLText (plain, truncate)": lambda p: ours(p, NEGATIVE),
            "clipworks SDXLText (A1111 syntax, long prompts)": lambda p: ours_a1111(p, NEGATIVE),
        }
        runs = race(contenders, prompts, args.repeats)
    base = statistics.median(runs["diffusers encode_prompt"])
    sizes = f"text 1: {args.width1}x{args.layers1}, text 2: {args.width2}x{args.layers2} (proj {args.embed2})"
    print(f"\nSDXL prompt encoding, prompt + negative, batch 1, {sizes}; median of {args.repeats} passes over "
          f"{len(prompts)} prompts")  # fmt: skip
    print("| encoder | ms/prompt (median) | ms/prompt (best) | speed vs diffusers |")
    print("|---|---|---|---|")
    for name, times in runs.items():
        median = statistics.median(times)
        print(f"| {name} | {median:.2f} | {min(times):.2f} | {base / median:.2f}x |")
    print(f"\nmax |clipworks - diffusers| over embeds, negative embeds and pooled: {diff:.1e}")


if __name__ == "__main__":
    main()
