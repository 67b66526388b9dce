"""Under torchrun-style environments (WORLD_SIZE=2, gloo on the CPU) evaluation splits the data and gathers the
features: the results equal one process's."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket

import torch
from PIL import Image
from reference import tiny_config

import clipworks
from clipworks.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, argv: list[str], log_dir: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    with open(os.path.join(log_dir, f"rank{rank}.log"), "w") as log, contextlib.redirect_stdout(log):
        code = main(argv)
        print(f"exit {code}")
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_results(tmp_path, capsys):
    torch.manual_seed(0)
    clipworks.save_pretrained(clipworks.create_model(tiny_config(clipworks.get_preset("ViT-B-32"))), tmp_path / "m")
    rows = []
    for i in range(7):  # an odd count, so the ranks get different shares
        Image.new("RGB", (16, 16), (30 * i, 200 - 20 * i, 90)).save(tmp_path / f"{i}.png")
        rows += [{"filepath": f"{i}.png", "caption": f"picture number {i}"}, {"filepath": f"{i}.png", "caption": f"shade {i}"}]
    (tmp_path / "bad.png").write_bytes(b"broken")
    rows.append({"filepath": "bad.png", "caption": "unreadable"})
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "caption"])
        writer.writeheader()
        writer.writerows(rows)

    def argv(out: str, *cache: str) -> list[str]:
        return ["eval", "retrieval", "--model", f"local-dir:{tmp_path / 'm'}", "--data", f"csv:{tmp_path / 'pairs.csv'}",
                "--no-progress", "--batch-size", "2", "--out", str(tmp_path / out), *cache]  # fmt: skip

    assert main(argv("one", "--no-cache")) == 0
    cache = ("--cache-dir", str(tmp_path / "cache"))
    # fork: the children reuse this process's imports (spawning two fresh interpreters costs ~20 s here)
    torch.multiprocessing.start_processes(_rank, args=(_free_port(), argv("two", *cache), str(tmp_path)), nprocs=2,
                                         start_method="fork")
    log0, log1 = ((tmp_path / f"rank{r}.log").read_text() for r in (0, 1))
    assert "exit 0" in log0 and "exit 0" in log1
    assert "8 images, 1 unreadable (skipped); embedded 4 images and 8 texts" in log0  # its half of each
    assert "processes" not in log1 and log1.strip() == "exit 0"  # rank 1 reports nothing
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["info"]["processes"] == 2 and one["info"]["processes"] == 1
    assert two["metrics"] == one["metrics"]
    # rank 0 cached the gathered features of all the images and texts: one process reads them back
    assert main(argv("three", *cache)) == 0
    assert "embedded 0 images and 0 texts, 2 feature set(s) read from the cache" in capsys.readouterr().out
    assert json.loads((tmp_path / "three" / "results.json").read_text())["metrics"] == one["metrics"]
