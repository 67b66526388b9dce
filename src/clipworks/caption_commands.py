"""The `clipworks caption` subcommand: captions for image files from a CoCa model, one `path<TAB>caption` line each."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator

from .cli import CommandFailed, UsageError, add_device_flag, add_seed_flag, default_device, examples

GENERATIONS = ("beam_search", "top_k", "top_p")  # models.coca.GENERATION_TYPES (not imported: it imports torch)
_MIN_SEQ_LEN = 5  # OpenCLIP's min_seq_len: no end of text before it


def captions_text(tokenizer, ids) -> list[str]:
    """The text of each generated sequence (B, T): start and end tokens and the padding after the end dropped."""
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids.tolist()]


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _load(paths: Iterable[str], preprocess) -> tuple[list[str], list, int]:
    """The readable images among `paths`, preprocessed, and how many were skipped (each named on stderr)."""
    from .data.decode import ImageDecodeError, load_image

    kept, tensors, skipped = [], [], 0
    for path in paths:
        try:
            tensors.append(preprocess(load_image(path)))
            kept.append(path)
        except (ImageDecodeError, OSError) as e:
            skipped += 1
            print(f"skipped {path}: {e}", file=sys.stderr)
    return kept, tensors, skipped


def _cmd_caption(args: argparse.Namespace) -> int:
    import torch

    from .factory import create_model_and_transforms, get_tokenizer
    from .search.commands import refuse_random_weights

    if args.max_length <= _MIN_SEQ_LEN:
        raise UsageError(f"--max-length must be more than {_MIN_SEQ_LEN} tokens, got {args.max_length}")
    if args.top_k < 1 or not 0 <= args.top_p <= 1 or args.temperature <= 0:
        raise UsageError("--top-k must be at least 1, --top-p in [0, 1] and --temperature above 0")
    if args.num_beams < 2 or args.num_beam_groups < 1 or args.num_beams % args.num_beam_groups:
        raise UsageError(f"--num-beams ({args.num_beams}) must be at least 2 and a multiple of --num-beam-groups "
                         f"({args.num_beam_groups})")  # fmt: skip
    refuse_random_weights(args)
    device = default_device(args.device)
    torch.manual_seed(args.seed)  # the random weights (--random-init) and the draws (top_p, top_k > 1)
    model, _, preprocess = create_model_and_transforms(args.model, args.pretrained, device=device)
    if model.decoder is None:
        raise UsageError(f"--model {args.model} has no caption decoder: captions need a CoCa model "
                         "(coca_ViT-B-32, coca_ViT-L-14, coca_base, ...)")  # fmt: skip
    tokenizer = get_tokenizer(model)
    settings = dict(generation_type=args.generation, seq_len=args.max_length, top_k=args.top_k, top_p=args.top_p,
                    temperature=args.temperature, num_beams=args.num_beams, num_beam_groups=args.num_beam_groups,
                    min_seq_len=_MIN_SEQ_LEN)  # fmt: skip
    captioned = skipped = 0
    for paths in _batches(args.images, args.batch_size):
        kept, tensors, missed = _load(paths, preprocess)
        skipped += missed
        if not kept:
            continue
        ids = model.generate(torch.stack(tensors).to(device), **settings)  # (B, T)
        for path, text in zip(kept, captions_text(tokenizer, ids)):
            print(f"{path}\t{text}", flush=True)
        captioned += len(kept)
    if skipped:
        print(f"{skipped} unreadable image{'s' * (skipped != 1)} skipped", file=sys.stderr)
    if not captioned:
        raise CommandFailed(f"none of the {len(args.images)} images could be read")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `caption` to the `clipworks` parser."""
    from .search.commands import add_random_init_flag

    p = sub.add_parser("caption", help="caption images with a CoCa model",
                       description="Print `path<TAB>caption` for each image, generated as OpenCLIP's CoCa.generate "
                                   "does (the same tokens for the same weights and seed).",
                       epilog=examples("clipworks caption --model coca_ViT-B-32:laion2b_s13b_b90k photo.jpg",
                                       "clipworks caption --model coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k "
                                       "--generation top_p --top-p 0.9 --seed 1 photos/*.jpg",
                                       "clipworks caption --model coca_ViT-B-32:laion2b_s13b_b90k --generation top_k "
                                       "--device cpu cat.png dog.png"))  # fmt: skip
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files; unreadable ones are skipped and counted")
    p.add_argument("--model", required=True, help="a CoCa preset, NAME:TAG, local-dir:DIR or hf-hub:ORG/REPO")
    p.add_argument("--pretrained", default=None, help="registry tag, weights file or checkpoint directory")
    p.add_argument("--generation", choices=GENERATIONS, default="beam_search",
                   help="beam_search (OpenCLIP's default); top_k: sample from the K likeliest tokens (K=1: greedy, "
                        "the fastest); top_p: nucleus sampling (default: beam_search)")
    p.add_argument("--num-beams", type=int, default=6, help="beam_search: beams per image (default: 6)")
    p.add_argument("--num-beam-groups", type=int, default=3,
                   help="beam_search: groups the beams are split into, dividing --num-beams (default: 3)")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="tokens top_k samples from (default: 1, greedy)")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P",
                   help="top_p keeps the likeliest tokens whose probabilities sum past P (default: 0.9)")
    p.add_argument("--temperature", type=float, default=1.0, help="divides the logits before sampling (default: 1)")
    p.add_argument("--max-length", type=int, default=30, metavar="N",
                   help="longest caption in tokens, start and end included (default: 30)")
    p.add_argument("--batch-size", type=int, default=8, help="images captioned together (default: 8)")
    add_device_flag(p)
    add_seed_flag(p, help="seed for random initialisation (with --random-init) and for sampling (default: 0)")
    add_random_init_flag(p)
    p.set_defaults(func=_cmd_caption)
