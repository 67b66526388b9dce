"""The `clipworks` command line: a thin shell over the library's functions.

Every error is one line on stderr, `clipworks COMMAND: error: ...`, and the exit status says whose it is: 2 when the
command line asks for something that cannot work (an unknown option, a bad value, a device this machine lacks, a
config file that does not parse), 1 when a well-formed command fails at run time (a file missing or unreadable, the
network, a port in use, a missing optional dependency).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings

# clipworks.checkpoints.export.FORMATS, spelled out so that building the parser does not import torch.
CHECKPOINT_FORMATS = ("clipworks", "open_clip", "transformers")
# Subsystems that own their subcommands: each module has `add_commands(subparsers)`.
COMMAND_MODULES = ("clipworks.eval.commands", "clipworks.eval.benchmark", "clipworks.caption_commands",
                   "clipworks.search.commands", "clipworks.serve.commands")


class UsageError(ValueError):
    """A value on the command line that cannot work (exit status 2, as for an unknown option)."""


class CommandFailed(Exception):
    """A well-formed command that could not do its work, e.g. not one of its input files readable (exit status 1)."""


class Parser(argparse.ArgumentParser):
    """argparse, with help that keeps the examples' lines and errors in one line: `clipworks CMD: error: ...`.

    Subcommands' parsers are of this class too (`add_subparsers` uses the parent's class)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def examples(*lines: str) -> str:
    """The epilog of a subcommand's --help: real command lines, one a line."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


# Shared flags: one spelling per concept across the subcommands ------------------------------------------------

DEVICES = ("cpu", "cuda", "cuda:N", "mps", "xpu", "xpu:N")
_DEVICE = re.compile(r"cpu|mps|(cuda|xpu)(:\d+)?")


def check_device(name: str) -> str:
    """`--device`'s argparse type, shared by every command that runs a model: a torch device string naming a device
    this machine has. torch is imported only to check an accelerator, which the command then loads torch for."""
    if not _DEVICE.fullmatch(name):
        raise argparse.ArgumentTypeError(f"{name!r} is not a torch device; expected one of {', '.join(DEVICES)}")
    if name == "cpu":
        return name
    import torch

    kind, _, index = name.partition(":")
    backend = {"cuda": torch.cuda, "mps": torch.backends.mps, "xpu": getattr(torch, "xpu", None)}[kind]
    if backend is None or not backend.is_available():
        why = "no device found" if kind != "cuda" or torch.version.cuda else "this torch is built without CUDA"
        raise argparse.ArgumentTypeError(f"{name}: {kind.upper()} is not available on this machine ({why}); "
                                         "use --device cpu")  # fmt: skip
    if index and int(index) >= backend.device_count():
        raise argparse.ArgumentTypeError(f"{name}: this machine has {backend.device_count()} {kind.upper()} "
                                         f"device(s), numbered from 0")  # fmt: skip
    return name


def add_device_flag(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """`--device`; None (the default unless `default`) means `default_device()`."""
    auto = "cuda when available, else cpu" if default is None else default
    p.add_argument("--device", type=check_device, default=default, metavar="DEVICE",
                   help=f"torch device: {', '.join(DEVICES)} (default: {auto})")  # fmt: skip


def default_device(name: str | None):
    """The torch device of a checked `--device`, or when None, CUDA (this process' LOCAL_RANK under torchrun) if
    available, else the CPU."""
    import torch

    if name is not None:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def add_quiet_flag(p: argparse.ArgumentParser, help: str = "no progress bars") -> None:
    """`--quiet` (args.quiet); `--no-progress`, its former spelling, is still accepted but not shown."""
    p.add_argument("--quiet", action="store_true", help=help)
    p.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)


def add_seed_flag(p: argparse.ArgumentParser, help: str = "seed for random initialisation (with --random-init)",
                  default: int | None = 0) -> None:  # fmt: skip
    p.add_argument("--seed", type=int, default=default, help=help)


def port_number(text: str) -> int:
    """`--port`'s argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a port must be a number from 0 to 65535")
    return port


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
            try:
                with torch.device("meta"):  # shapes only: counting parameters allocates nothing
                    params = f"{sum(p.numel() for p in CLIP(cfg).parameters()) / 1e6:8.1f}M params"
            except ImportError as e:  # a timm tower on the core install: listed all the same, uncounted
                extra = re.search(r"clipworks\[\w+\]", str(e))
                if extra is None:
                    raise
                params = f"params: pip install '{extra.group()}'"
            v, t = cfg.vision, cfg.text
            print(f"  {name:<34} {v.kind} {v.image_size}px  text {t.kind} {t.width}x{t.layers}  "
                  f"embed_dim={cfg.embed_dim:<5} {params}")  # fmt: skip
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
    model, _, preprocess = create_model_and_transforms(args.model, args.pretrained, device=default_device(args.device))
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

    if (args.out is None) == (args.out_dir is None):  # `clipworks convert OUT`, the former spelling, still works
        raise UsageError("give the directory to write once, as --out DIR")
    args.out = args.out or args.out_dir
    model = create_model(args.model, args.pretrained, device=args.device)
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
    try:
        from .train.config import load_config
        from .train.console import TrainingInterrupted
        from .train.loop import NonFiniteLossError, train

        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except NonFiniteLossError as e:
        print(f"clipworks train: stopped: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:  # Ctrl-C: where the run's state went and how to resume it, no traceback
        print(f"clipworks train: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the run began (torch still loading)
        print("clipworks train: interrupted before training began: nothing saved", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .search.commands import add_random_init_flag

    epilog = (examples("clipworks demo --model ViT-B-32:openai", "clipworks models --pretrained",
                       "clipworks COMMAND --help")
              + "\n\nexit status: 0 done, 1 failed at run time (files, network, ports), 2 a bad command line")
    parser = Parser(prog="clipworks", description=__doc__.split("\n", 1)[0], epilog=epilog)
    parser.add_argument("--version", action="version", version=f"clipworks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the model presets (and their pretrained tags)",
                       epilog=examples("clipworks models", "clipworks models --pretrained"))  # fmt: skip
    p.add_argument("--pretrained", action="store_true", help="also list each preset's pretrained weights tags")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("demo", help="encode the shipped images and captions and print their similarities",
                       epilog=examples("clipworks demo --model ViT-B-32:openai",
                                       "clipworks demo --model ViT-B-32 --random-init --seed 1"))  # fmt: skip
    p.add_argument("--model", default="ViT-B-32", help="preset name or local-dir:DIR (default: ViT-B-32)")
    p.add_argument("--pretrained", default=None, help="weights file or clipworks directory for a preset")
    p.add_argument("--data", default=None, help="a folder with captions.tsv (filepath, caption); default: shipped")
    add_device_flag(p)
    add_seed_flag(p)
    add_random_init_flag(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("tokenize", help="print the token ids of texts, as the model's tokenizer gives them",
                       epilog=examples('clipworks tokenize "a photo of a cat" "a dog"',
                                       'clipworks tokenize --model ViT-B-16-SigLIP:webli "a cat"'))  # fmt: skip
    p.add_argument("text", nargs="+")
    p.add_argument("--model", default="ViT-B-32", help="preset, NAME:TAG, local-dir:DIR or hf-hub:ORG/REPO")
    p.add_argument("--context-length", type=int, default=None, help="tokens per text (default: the model's)")
    p.add_argument("--language", default=None, help="source language of an NLLB tokenizer (default eng_Latn)")
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("convert", help="write a model as a clipworks, OpenCLIP, transformers or ONNX directory",
                       epilog=examples("clipworks convert --model ViT-B-32:openai --to open_clip --out vit-b-32",
                                       "clipworks convert --model local-dir:runs/mine/model --to onnx --normalize "
                                       "--out mine-onnx"))  # fmt: skip
    p.add_argument("--out", default=None,
                   help="directory to write (an existing checkpoint directory there is replaced)")
    p.add_argument("out_dir", nargs="?", default=None, help=argparse.SUPPRESS)  # the former positional OUT
    p.add_argument("--model", required=True, help="preset, NAME:TAG, local-dir:DIR or hf-hub:ORG/REPO")
    p.add_argument("--pretrained", default=None, help="registry tag, weights file or checkpoint directory")
    p.add_argument("--to", required=True, choices=(*CHECKPOINT_FORMATS, "onnx"), help="the layout to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (18 or later; --to onnx only)")
    p.add_argument("--normalize", action="store_true", help="ONNX graphs return unit-norm features")
    add_device_flag(p, default="cpu")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("train", allow_abbrev=False, epilog=_train_epilog(),
                       help="train a CLIP model (default: a small one on synthetic shapes)",
                       description="Train a CLIP model. With no arguments it trains the built-in ten-minute synthetic "
                                   "run into runs/<timestamp>.")  # fmt: skip
    p.add_argument("--config", default=None, help="a YAML run config; overrides apply on top of it")
    add_quiet_flag(p, help="no progress bar (--run.progress false)")
    add_device_flag(p)
    add_seed_flag(p, help="seeds initialisation, data order and augmentation (--run.seed)", default=None)
    p.add_argument("--batch-size", type=int, default=None, help="images per step on each process (--data.batch_size)")
    p.add_argument("--out", default=None, help="the run directory (--run.out_dir; default runs/<timestamp>)")
    p.set_defaults(func=_cmd_train)

    for module in COMMAND_MODULES:  # each adds its subcommands; none imports torch at this point
        importlib.import_module(module).add_commands(sub)
    for name, p in sub.choices.items():  # each command's help ends with the extras it needs
        if name in COMMAND_EXTRAS:  # every command is (tests/test_packaging.py)
            _add_install_note(p, install_note(name))
    return parser


def _train_epilog() -> str:
    """`clipworks train --help`'s list of config keys, made from the typed config (`clipworks.train.config`)."""
    from .train.config import config_keys

    keys = config_keys()
    rows = [(f"--{k.name} {k.default}", k.help) for k in keys]
    width = min(max(len(left) for left, _ in rows), 40) + 2
    lines = [left.ljust(width) + help if len(left) < width else f"{left}  {help}" for left, help in rows]
    return "\n".join([
        "config keys: --section.key VALUE (or --section.key=VALUE) overrides --config, which overrides the defaults\n"
        "shown here; --quiet, --device, --seed, --batch-size and --out set the keys their help names",
        *(f"  {line}" for line in lines), "",
        examples("clipworks train", "clipworks train --run.steps 200 --batch-size 64 --quiet",
                 "clipworks train --config run.yaml --loss.kind siglip --out runs/siglip"),
    ])  # fmt: skip


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """`clipworks train`'s shared flags as the config overrides they stand for (the explicit ones come after)."""
    flags = {"run.progress": "false" if args.quiet else None, "run.device": args.device, "run.seed": args.seed,
             "data.batch_size": args.batch_size, "run.out_dir": args.out}  # fmt: skip
    return [f"--{key}={value}" for key, value in flags.items() if value is not None]


# Which extra installs a module the optional commands import (tests/test_packaging.py checks it against the wheel).
EXTRA_OF_MODULE = {
    **dict.fromkeys(("pyarrow", "faiss", "fastapi", "starlette", "pydantic", "uvicorn", "h11", "httpx", "multipart",
                     "simplejpeg", "prometheus_client"), "search"),
    **dict.fromkeys(("huggingface_hub", "tokenizers", "sentencepiece"), "hub"),
    **dict.fromkeys(("onnx", "onnxruntime", "onnxscript"), "onnx"),
    "timm": "timm",
    "tensorboard": "train",
    "wandb": "wandb",
    "matplotlib": "plots",
    **dict.fromkeys(("fsspec", "aiohttp"), "http"),
    "s3fs": "s3",
    "pymilvus": "milvus",
    "lancedb": "lancedb",
    "langchain_core": "langchain",
    "llama_index": "llamaindex",
    "chromadb": "chroma",
}  # fmt: skip

# What each command needs beyond the core install: (extras it cannot run without, {extra: what needs it}). Each
# command's --help ends with them (`install_note`); tests/test_packaging.py runs every command and checks that each
# third-party module it imports comes with the core install or with an extra its help names.
_MODEL_EXTRAS = {
    "hub": "weights from the hub (NAME:TAG, hf-hub:ORG/REPO); SigLIP, MetaCLIP 2 and multilingual tokenizers",
    "timm": "EVA-CLIP, PE-Core, ViTamin and MobileCLIP image towers",
}  # fmt: skip
_STREAM_EXTRAS = {
    "s3": "wds: shards on S3 or an S3-compatible store (s3://)",
    "gcs": "wds: shards on Google Cloud Storage (gs://)",
    "http": "wds: shards over http:// and https://",
}  # fmt: skip
COMMAND_EXTRAS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "models": ((), {"timm": "the parameter counts of the EVA-CLIP, PE-Core, ViTamin and MobileCLIP presets"}),
    "demo": ((), _MODEL_EXTRAS),
    "tokenize": ((), {"hub": "hf-hub:ORG/REPO models; SigLIP, MetaCLIP 2 and multilingual tokenizers"}),
    "convert": ((), {**_MODEL_EXTRAS, "onnx": "--to onnx"}),
    "train": ((), {**_MODEL_EXTRAS, "train": "TensorBoard scalars (--run.tensorboard)",
                   "plots": "the training curves (curves.png, curves.svg)",
                   "wandb": "Weights & Biases logging (--run.wandb)", **_STREAM_EXTRAS}),
    "classify": ((), _MODEL_EXTRAS),
    "score": ((), _MODEL_EXTRAS),
    "eval": ((), {**_MODEL_EXTRAS, "plots": "the figures written with --out"}),
    "benchmark": ((), {**_MODEL_EXTRAS, "plots": "a plot per collection (OUT/plots/NAME.png, .svg)"}),
    "caption": ((), _MODEL_EXTRAS),
    "embed": (("search",), {**_MODEL_EXTRAS, **_STREAM_EXTRAS}),
    "index": (("search",), {"milvus": "--out milvus:URI?collection=NAME", "lancedb": "--out lancedb:DIR?table=NAME"}),
    "dedup": (("search",), {}),
    "serve": (("search",), {**_MODEL_EXTRAS, "milvus": "--index NAME=milvus:...", "lancedb": "--index NAME=lancedb:..."}),
}  # fmt: skip


def install_note(command: str) -> str:
    """The end of `clipworks COMMAND --help`: the extras COMMAND needs and those some of its inputs need."""
    required, optional = COMMAND_EXTRAS[command]
    if required:
        lines = [f"needs: pip install 'clipworks[{','.join(required)}]'"]
    else:
        lines = ["needs: nothing beyond the core install (pip install clipworks)"]
    if optional:
        width = max(len(name) for name in optional) + 4
        lines.append("optional extras (pip install 'clipworks[NAME]'):")
        lines += [f"  {f'[{name}]':<{width}}{why}" for name, why in optional.items()]
    return "\n".join(lines)


def _add_install_note(parser: argparse.ArgumentParser, note: str) -> None:
    """Append `note` to the epilog of `parser` and of its own subcommands (`eval`'s tasks)."""
    parser.epilog = f"{parser.epilog}\n\n{note}" if parser.epilog else note
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_install_note(sub, note)


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


def exit_status(e: Exception) -> int | None:
    """The exit status for an error a command raised: 2 for the command line's fault (UsageError and the library's
    ValueErrors for bad input: unknown names, keys, values, combinations), 1 for a failure at run time (OSError:
    files, network, ports; a missing optional dependency; a download that failed its checksum; CommandFailed); None
    for anything else, a bug, which keeps its traceback."""
    hub = sys.modules.get("clipworks.hub")  # not imported: none of its errors can have been raised
    if isinstance(e, (OSError, ImportError, CommandFailed)) or (hub is not None and isinstance(e, hub.ChecksumError)):
        return 1
    return 2 if isinstance(e, ValueError) else None


def main(argv: list[str] | None = None) -> int:
    configure_openmp()
    # The library warns once when a preset is built without weights (clipworks.RandomWeightsWarning); commands refuse
    # that unless given --random-init, and say it themselves when they are.
    warnings.filterwarnings("ignore", message=r".*has random \(untrained\) weights")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        print(f"clipworks {args.command}: error: unrecognized arguments: {' '.join(extra)} "
              f"(see clipworks {args.command} --help)", file=sys.stderr)  # fmt: skip
        return 2
    args.overrides = [*_train_overrides(args), *extra] if args.command == "train" else extra
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`clipworks models | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush cannot fail again
        return 1
    except Exception as e:
        status = exit_status(e)
        if status is None:
            raise
        message = _missing_extra(e) if isinstance(e, ImportError) else str(e)
        message = re.sub(r"\s*\n\s*", " ", message.strip())  # one line, whatever the library's message
        print(f"clipworks {args.command}: error: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    from clipworks.cli import main as _main  # `python -m`: the importable module's main, so its error classes are used

    sys.exit(_main())
