"""The `clipworks` command line: a thin shell over the library's functions."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# clipworks.checkpoints.export.FORMATS, spelled out so that building the parser does not import torch.
CHECKPOINT_FORMATS = ("clipworks", "open_clip", "transformers")
# Subsystems that own their subcommands: each module has `add_commands(subparsers)`.
COMMAND_MODULES = ("clipworks.eval.commands", "clipworks.search.commands", "clipworks.serve.commands")


def _cmd_models(args: argparse.Namespace) -> int:
    import torch

    from .models.clip import CLIP
    from .presets import PRESETS, preset_family
    from .pretrained import list_pretrained

    tags: dict[str, list[str]] = {}
    for model, tag in list_pretrained():
        tags.setdefault(model, []).append(tag)
    families: dict[str, list[str]] = {}
    for name in sorted(PRESETS):
        families.setdefault(preset_family(name), []).append(name)
    for family, names in families.items():
        print(f"{family} ({len(names)})")
        for name in names:
            cfg = PRESETS[name]
            with torch.device("meta"):  # shapes only: counting parameters allocates nothing
                params = sum(p.numel() for p in CLIP(cfg).parameters())
            v, t = cfg.vision, cfg.text
            print(f"  {name:<34} {v.kind} {v.image_size}px  text {t.kind} {t.width}x{t.layers}  "
                  f"embed_dim={cfg.embed_dim:<5} {params / 1e6:8.1f}M params")  # fmt: skip
            if args.pretrained and name in tags:
                print(f"      pretrained: {', '.join(tags[name])}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .demo import read_demo_pairs, similarity_table
    from .factory import create_model_and_transforms, get_tokenizer
    from .search.commands import refuse_random_weights

    refuse_random_weights(args)
    torch.manual_seed(args.seed)
    model, _, preprocess = create_model_and_transforms(args.model, args.pretrained)
    tokenizer = get_tokenizer(args.model)
    pairs = read_demo_pairs(args.data)
    weights = args.pretrained or ("from " + args.model if ":" in args.model else "random (untrained) weights")
    print(f"model {args.model}, {weights}; {len(pairs)} images and captions")
    table = similarity_table(model, preprocess, tokenizer, pairs)
    print(table.format())
    print(f"images whose own caption ranks first: {table.top1_accuracy():.0%} (chance {1 / len(pairs):.0%})")
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from .factory import get_tokenizer

    language = {"language": args.language} if args.language else {}
    tok = get_tokenizer(args.model, args.context_length, **language)
    batch = tok.tokenize(args.text)
    for text, ids, mask in zip(args.text, batch.ids.tolist(), batch.attention_mask.tolist()):
        print(f"{text!r}: {[i for i, real in zip(ids, mask) if real]}")  # real tokens only, wherever padding is
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints.export import save_pretrained
    from .factory import create_model

    model = create_model(args.model, args.pretrained)
    if args.to == "onnx":
        from .onnx_export import export_onnx

        out = export_onnx(model, args.out, opset=args.opset, normalize=args.normalize).path
    else:
        out = save_pretrained(model, args.out, format=args.to)
    weights = args.pretrained or (args.model if ":" in args.model else "random (untrained) weights")
    print(f"wrote {args.model} ({weights}) in the {args.to} layout to {out}:")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:<32} {f.stat().st_size:>12,} bytes")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.config import load_config
    from .train.loop import NonFiniteLossError, train

    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg)
    except NonFiniteLossError as e:
        print(f"clipworks train: stopped: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .search.commands import add_random_init_flag

    parser = argparse.ArgumentParser(prog="clipworks", description=__doc__)
    parser.add_argument("--version", action="version", version=f"clipworks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model presets (and their pretrained tags)")
    p.add_argument("--pretrained", action="store_true", help="also list each preset's pretrained weights tags")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("demo", help="encode the shipped images and captions and print their similarities")
    p.add_argument("--model", default="ViT-B-32", help="preset name or local-dir:DIR (default: ViT-B-32)")
    p.add_argument("--pretrained", default=None, help="weights file or clipworks directory for a preset")
    p.add_argument("--data", default=None, help="a folder with captions.tsv (filepath, caption); default: shipped")
    p.add_argument("--seed", type=int, default=0, help="seed for random initialisation (with --random-init)")
    add_random_init_flag(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("tokenize", help="print the token ids of texts, as the model's tokenizer gives them")
    p.add_argument("text", nargs="+")
    p.add_argument("--model", default="ViT-B-32", help="preset, NAME:TAG, local-dir:DIR or hf-hub:ORG/REPO")
    p.add_argument("--context-length", type=int, default=None, help="tokens per text (default: the model's)")
    p.add_argument("--language", default=None, help="source language of an NLLB tokenizer (default eng_Latn)")
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("convert", help="write a model as a clipworks, OpenCLIP, transformers or ONNX directory")
    p.add_argument("out", help="directory to write (an existing checkpoint directory there is replaced)")
    p.add_argument("--model", required=True, help="preset, NAME:TAG, local-dir:DIR or hf-hub:ORG/REPO")
    p.add_argument("--pretrained", default=None, help="registry tag, weights file or checkpoint directory")
    p.add_argument("--to", required=True, choices=(*CHECKPOINT_FORMATS, "onnx"), help="the layout to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (18 or later; --to onnx only)")
    p.add_argument("--normalize", action="store_true", help="ONNX graphs return unit-norm features")
    p.set_defaults(func=_cmd_convert)

    epilog = ("Any --section.key value (sections model, data, optim, loss, run) overrides the config; with no "
              "arguments it trains the built-in ten-minute synthetic run into runs/<timestamp>.")  # fmt: skip
    p = sub.add_parser("train", allow_abbrev=False, epilog=epilog,
                       help="train a CLIP model (default: a small one on synthetic shapes)")  # fmt: skip
    p.add_argument("--config", default=None, help="a YAML run config; overrides apply on top of it")
    p.set_defaults(func=_cmd_train)

    for module in COMMAND_MODULES:  # each adds its subcommands; none imports torch at this point
        importlib.import_module(module).add_commands(sub)
    return parser


# Which extra installs a module the optional commands import (tests/test_packaging.py checks it against the wheel).
EXTRA_OF_MODULE = {
    **dict.fromkeys(("pyarrow", "faiss", "fastapi", "starlette", "pydantic", "uvicorn", "h11", "httpx", "multipart",
                     "simplejpeg"), "search"),
    **dict.fromkeys(("huggingface_hub", "tokenizers", "sentencepiece"), "hub"),
    **dict.fromkeys(("onnx", "onnxruntime", "onnxscript"), "onnx"),
    "timm": "timm",
    "tensorboard": "train",
}  # fmt: skip


def _missing_extra(e: ImportError) -> str:
    """An ImportError's message, with the extra that installs the missing module when the message does not say."""
    message = str(e)
    extra = EXTRA_OF_MODULE.get((e.name or "").split(".")[0])
    if extra is None or "clipworks[" in message:
        return message
    return f"{message}: pip install 'clipworks[{extra}]'"


# OpenMP threads spin this many rounds waiting for work before they sleep (libgomp's default is 300,000, ~ms).
OPENMP_SPIN = "1000"


def configure_openmp() -> bool:
    """Make OpenMP's idle threads sleep soon instead of spinning (libgomp's GOMP_SPINCOUNT, unless the user set it
    or OMP_WAIT_POLICY); True when set. Must run before torch loads its OpenMP runtime, which reads the setting
    once: the command line calls it first.

    Why: on a machine where another process holds a core, a compute thread that spins for a descheduled peer burns
    the time that peer (or a DataLoader worker) needs. Measured on 2 cores (benchmarks/RESULTS.md): the default
    training run kept 49% of its quiet samples/s beside a one-core busy loop with libgomp's default, 68% with this,
    and ran 22% faster on the quiet machine too (its data worker gets the core the spinners held); inference on a
    quiet machine is unchanged (the passive policy, which never spins, lost 4-8% there).
    """
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN  # DataLoader workers and torchrun's processes inherit it
    return True


def main(argv: list[str] | None = None) -> int:
    configure_openmp()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`clipworks models | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush cannot fail again
        return 1
    except (ValueError, OSError, ImportError) as e:  # bad input, missing files, offline hub, missing extras
        message = _missing_extra(e) if isinstance(e, ImportError) else e
        print(f"clipworks {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
