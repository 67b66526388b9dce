"""The command line's errors: one line `clipworks CMD: error: ...`, no traceback; exit status 2 for a command line
that cannot work, 1 for a failure at run time (files, network, ports)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from reference import tiny_config

import clipworks
from clipworks.cli import main

# every command that runs a model, with the arguments it needs besides --device
MODEL_COMMANDS = {
    "demo": [], "convert": ["--model", "m", "--to", "clipworks", "--out", "o"], "train": [],
    "classify": ["--model", "m", "--labels", "a,b", "x.png"], "score": ["--head", "h", "x.png"],
    "eval": ["zeroshot", "--model", "m", "--data", "folder:d"], "embed": ["--model", "m", "--data", "d", "--out", "o"],
    "serve": ["--index", "i", "--model", "m"],
}  # fmt: skip


def _run(capsys, *argv) -> tuple[int, str]:
    """(exit status, stderr) of `clipworks argv` run in this process."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors
        status = e.code
    return status, capsys.readouterr().err


def _one_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"clipworks {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _clipworks(*argv, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipworks.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(the --model argument of a saved tiny model, its embed_dim, a folder with a photo in it)."""
    root = tmp_path_factory.mktemp("cli_errors")
    torch.manual_seed(0)
    model = clipworks.create_model(tiny_config(clipworks.get_preset("ViT-B-32")))
    clipworks.save_pretrained(model, root / "model")
    Image.new("RGB", (40, 30), (200, 40, 40)).save(root / "photo.png")
    return f"local-dir:{root / 'model'}", model.config.embed_dim, root


# --device ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_a_device_that_is_not_one_lists_the_valid_ones(command, capsys):
    # the bad value fails as argparse reads it, before any missing argument is noticed
    argv = ["eval", "zeroshot"] if command == "eval" else [command]
    status, err = _run(capsys, *argv, "--device", "gpu")
    line = _one_line(err, " ".join(argv))
    assert status == 2 and "'gpu' is not a torch device" in line and "cpu, cuda, cuda:N, mps" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_machine_without_it_is_a_usage_error(device, capsys):
    status, err = _run(capsys, "classify", "--model", "m", "--labels", "a,b", "x.png", "--device", device)
    line = _one_line(err, "classify")
    assert status == 2 and "CUDA is not available on this machine" in line and "--device cpu" in line


def test_the_process_prints_one_line_and_exits_2_for_a_bad_device():
    out = _clipworks("embed", "--model", "m", "--data", "d", "--out", "o", "--device", "gpu")
    assert out.returncode == 2 and out.stdout == ""
    _one_line(out.stderr, "embed")


# usage errors of the command line itself -------------------------------------------------------------------------


@pytest.mark.parametrize("argv, command, message", [
    (["embed", "--model", "m"], "embed", "the following arguments are required: --data, --out"),
    (["models", "--colour"], "models", "unrecognized arguments: --colour"),
    (["classify", "--model", "m", "--labels", "a", "--top", "0", "x.png"], "classify", "--top 0: expected at least 1"),
    (["convert", "--model", "m", "--to", "onnx"], "convert", "--out DIR"),
    (["serve", "--index", "i", "--model", "m", "--port", "99999"], "serve", "from 0 to 65535"),
    (["serve", "--index", "i", "--model", "m", "--port", "http"], "serve", "from 0 to 65535"),
    (["train", "--run.stpes", "3"], "train", "unknown config key 'run.stpes'"),
])  # fmt: skip
def test_usage_errors_are_one_line_and_exit_2(argv, command, message, capsys):
    status, err = _run(capsys, *argv)
    assert status == 2 and message in _one_line(err, command)


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: [1\n  seed: 2\n")
    status, err = _run(capsys, "train", "--config", bad)
    line = _one_line(err, "train")
    assert status == 2 and f"{bad}:3:7: YAML syntax error: expected ',' or ']'" in line
    status, err = _run(capsys, "train", "--config", tmp_path / "missing.yaml")
    assert status == 1 and "No such file or directory" in _one_line(err, "train")


# run-time failures ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--model", "ViT-B-32:./ViT-B-32.safetensors"],
                                  ["--model", "ViT-B-32", "--pretrained", "./ViT-B-32.safetensors"],
                                  ["--model", "ViT-B-32", "--pretrained", "weights.pth"]])  # fmt: skip
def test_a_missing_weights_file_is_named_as_missing(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, err = _run(capsys, "convert", *argv, "--to", "clipworks", "--out", tmp_path / "out")
    line = _one_line(err, "convert")
    assert status == 1 and "does not exist" in line and "unknown pretrained tag" not in line


def test_an_unreachable_hub_fails_at_once_in_one_line(tmp_path):
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=dead, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    start = time.monotonic()
    out = _clipworks("convert", "--model", "ViT-B-32:openai", "--to", "clipworks", "--out", tmp_path / "o", env=env)
    took = time.monotonic() - start
    line = _one_line(out.stderr, "convert")
    assert out.returncode == 1 and "the hub could not be reached" in line and "not in the local cache" in line
    assert took < 20, f"{took:.0f} s: huggingface_hub retried an unreachable hub"  # its retries took 48 s


def test_a_port_in_use_fails_before_announcing(saved, tmp_path, capsys, monkeypatch):
    from clipworks.search.index import build_index
    from clipworks.search.store import write_embeddings
    from clipworks.serve import server

    model_arg, embed_dim, _ = saved
    vectors = np.random.default_rng(0).standard_normal((4, embed_dim))
    write_embeddings(tmp_path / "emb", vectors, [{"key": f"k{i}"} for i in range(4)], model=model_arg)
    build_index(tmp_path / "emb", tmp_path / "index", kind="flat")
    monkeypatch.setattr(server, "run_server", lambda *a: pytest.fail("serve bound a port already in use"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, err = _run(capsys, "serve", "--index", tmp_path / "index", "--model", model_arg, "--port", port)
    line = _one_line(err, "serve")
    assert status == 1 and f"cannot serve on 127.0.0.1:{port}" in line and "pick another --port" in line
    assert "http://" not in err  # nothing announced


# `clipworks score` with LAION's kind of head -------------------------------------------------------------------


def test_score_reads_a_torch_state_dict_of_linear_layers(saved, tmp_path, capsys):
    """LAION's aesthetic predictor v2 is a .pth of Linear layers with dropout and no activations between them."""
    model_arg, embed_dim, root = saved
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(embed_dim, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 4),
                              torch.nn.Dropout(0.1), torch.nn.Linear(4, 1))  # fmt: skip
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "aesthetic.pth")
    status = main(["score", "--head", str(tmp_path / "aesthetic.pth"), "--model", model_arg, str(root / "photo.png")])
    printed = capsys.readouterr().out.split()
    from clipworks.eval.classify import encode_image_files

    model, _, preprocess = clipworks.create_model_and_transforms(model_arg)
    expected = mlp.eval()(encode_image_files(model, preprocess, [root / "photo.png"]).features).item()
    assert status == 0 and printed[1] == str(root / "photo.png")
    assert float(printed[0]) == pytest.approx(expected, abs=1e-4)

    status, err = _run(capsys, "score", "--head", tmp_path / "aesthetic.pth", root / "photo.png")
    assert status == 2 and "name it with --model" in _one_line(err, "score")


@pytest.mark.parametrize("content", ["a 3-d tensor", "not a head"])
def test_score_says_which_head_formats_it_reads(content, saved, tmp_path, capsys):
    model_arg, _, root = saved
    head = tmp_path / ("head.pth" if content == "a 3-d tensor" else "head.safetensors")
    if content == "a 3-d tensor":
        torch.save({"weight": torch.zeros(2, 3, 4)}, head)
    else:
        head.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    status, err = _run(capsys, "score", "--head", head, "--model", model_arg, root / "photo.png")
    line = _one_line(err, "score")
    assert status == 2 and "fit-score" in line and "LAION's aesthetic predictors" in line
