"""The command line speaks one dialect: the same spelling for a concept in every subcommand, an example in every
--help, and `clipworks train --help` generated from the typed run config."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex

import pytest

from clipworks.cli import add_device_flag, build_parser, check_device
from clipworks.train import config as run_config

# spellings other tools use for the concepts ours spell --quiet, --device, --out, --batch-size, --random-init, --seed
OTHER_SPELLINGS = {"--no-progress", "--progress", "--silent", "--output", "--output-dir", "--out-dir", "--outdir",
                   "--batch_size", "--bs", "--gpu", "--cuda", "--random_init", "--random-weights", "--no-pretrained",
                   "--random-seed", "--rng-seed"}  # fmt: skip
# which commands have which shared flag
SHARED = {
    "--quiet": {"embed", "train", "eval zeroshot", "eval retrieval", "eval linear-probe", "eval compositional",
                "eval clipscore", "eval fit-score", "benchmark"},
    "--batch-size": {"embed", "train", "eval zeroshot", "eval fit-score", "benchmark", "caption"},
    "--out": {"convert", "train", "embed", "index", "dedup", "eval zeroshot", "eval fit-score", "benchmark"},
    "--random-init": {"demo", "classify", "embed", "serve", "eval zeroshot", "benchmark", "caption"},
    "--device": {"benchmark", "caption"},
}  # fmt: skip


def _commands(parser: argparse.ArgumentParser | None = None):
    """(name, parser) of every subcommand, `eval`'s tasks included: ("eval zeroshot", ...)."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub.prog.removeprefix("clipworks "), sub
                yield from _commands(sub)


COMMANDS = dict(_commands())


def _visible_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings}


def _examples(help_text: str) -> list[str]:
    section = help_text.split("\nexamples:\n", 1)
    assert len(section) == 2, "no examples section"
    lines = []
    for line in section[1].splitlines():
        if not line.startswith("  "):
            break
        lines.append(line.strip())
    return lines


@pytest.mark.parametrize("name", COMMANDS)
def test_every_help_has_examples_that_parse(name):
    examples = _examples(COMMANDS[name].format_help())
    assert 1 <= len(examples) <= 3 and all(e.startswith("clipworks ") for e in examples), examples
    for example in examples:
        argv = shlex.split(example)[1:]
        if "--help" in argv:
            continue
        args, extra = build_parser().parse_known_args(argv)  # argparse exits on a bad example
        assert not extra or args.command == "train", (example, extra)


@pytest.mark.parametrize("name", COMMANDS)
def test_shared_concepts_have_one_spelling(name):
    options = _visible_options(COMMANDS[name])
    assert not OTHER_SPELLINGS & set(options), f"clipworks {name}: {sorted(OTHER_SPELLINGS & set(options))}"
    for flag, commands in SHARED.items():
        if name in commands:
            assert flag in options, f"clipworks {name} lacks {flag}"
    if "--random-init" in options:
        assert "--seed" in options, f"clipworks {name}: --random-init without --seed"


@pytest.mark.parametrize("name", [n for n, p in COMMANDS.items() if "--model" in _visible_options(p) or n == "train"])
def test_every_command_that_runs_a_model_takes_the_same_device_flag(name):
    if name == "tokenize":  # builds only a tokenizer
        return
    device = _visible_options(COMMANDS[name]).get("--device")
    assert device is not None, f"clipworks {name} has no --device"
    assert device.type is check_device  # one validation for all (tests/test_cli_errors.py checks its messages)


def test_former_spellings_still_parse_but_are_not_shown():
    parser = build_parser()
    args = parser.parse_args(["eval", "zeroshot", "--model", "m", "--data", "d", "--no-progress"])
    assert args.quiet is True
    args = parser.parse_args(["embed", "--model", "m", "--data", "d", "--out", "o", "--no-progress"])
    assert args.quiet is True
    args = parser.parse_args(["convert", "old-positional-out", "--model", "m", "--to", "clipworks"])
    assert args.out_dir == "old-positional-out" and args.out is None
    assert "--no-progress" not in COMMANDS["eval zeroshot"].format_help()
    assert "old-positional-out" not in COMMANDS["convert"].format_help() and "OUT_DIR" not in COMMANDS[
        "convert"].format_help()  # fmt: skip


def test_train_help_lists_every_config_key_with_its_default_and_help():
    help_text = " ".join(COMMANDS["train"].format_help().split())  # argparse may rewrap; compare words
    keys = run_config.config_keys()
    fields = [f"{s}.{f.name}" for s in run_config.SECTIONS
              for f in dataclasses.fields(getattr(run_config.TrainConfig(), s))]  # fmt: skip
    assert [k.name for k in keys] == fields
    for key in keys:
        assert key.help, f"{key.name} has no entry in its section's docstring"
        assert f"--{key.name} {key.default} {' '.join(key.help.split())}" in help_text
    assert "--run.steps 2000 optimiser steps in total" in help_text
    assert "--optim.betas 0.9,0.98" in help_text and "--model.pretrained none" in help_text


def test_train_shared_flags_set_config_keys_and_explicit_keys_win():
    from clipworks.cli import _train_overrides

    args, extra = build_parser().parse_known_args(["train", "--quiet", "--seed", "3", "--batch-size", "8", "--out",
                                                   "runs/x", "--device", "cpu", "--run.seed", "4"])  # fmt: skip
    cfg = run_config.load_config(None, [*_train_overrides(args), *extra])
    assert (cfg.run.progress, cfg.run.seed, cfg.data.batch_size, cfg.run.out_dir, cfg.run.device) == (
        False, 4, 8, "runs/x", "cpu")  # fmt: skip
    args, extra = build_parser().parse_known_args(["train"])
    assert _train_overrides(args) == [] and run_config.load_config(None, extra) == run_config.TrainConfig()


def test_version():
    parser = build_parser()
    assert "--version" in _visible_options(parser)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--version"])
    assert e.value.code == 0


def test_device_help_names_the_choices():
    parser = argparse.ArgumentParser()
    add_device_flag(parser)
    assert re.search(r"cpu, cuda, cuda:N, mps", " ".join(parser.format_help().split()))
