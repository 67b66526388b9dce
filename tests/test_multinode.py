"""Several machines: two torchrun agents (one process each, a c10d rendezvous on 127.0.0.1) train, save and
resume exactly like one machine with two processes; the rank, the GPU and "main" come from the right variables."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from clipworks.train import distributed
from clipworks.train import state as run_state

# The tiny default model, 4 steps of 2 x 8 images, a checkpoint at step 2, every step's loss in metrics.csv.
ARGS = ["--run.steps", "4", "--run.save_every", "2", "--data.batch_size", "8", "--data.workers", "0",
        "--run.eval_every", "0", "--data.eval_size", "0", "--run.tensorboard", "false", "--run.log_every", "1",
        "--run.progress", "false"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

# What torchrun starts on each machine: records the variables torchrun set, then runs `clipworks train`.
_WORKER = """
import json, os, sys
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")
with open(os.path.join(sys.argv[1], f"env{os.environ['RANK']}.json"), "w") as f:
    json.dump({k: int(os.environ[k]) for k in keys}, f)
from clipworks.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agents(argvs: list[list[str]], logs: list[Path]) -> list[int]:
    """Run one torchrun agent per argv; their exit codes. When one fails (or all take over 2 minutes) the others are
    stopped: they would wait for it until a rendezvous or collective timeout."""
    procs = []
    try:
        for argv, log in zip(argvs, logs):
            with log.open("w") as f:
                procs.append(subprocess.Popen(argv, env=ENV, stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if None not in codes or any(codes):  # all done, or one failed
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()  # torchrun stops its workers (each in a session of its own), then exits
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return [p.returncode for p in procs]


def _torchrun(launches: list[list[str]], out_dir: Path, *extra: str) -> list[dict[str, int]]:
    """Run `clipworks train` into `out_dir` under one torchrun agent per launch (torchrun's options); the workers'
    variables by rank. A launch that fails before any worker starts (a rendezvous port that another process took
    after `_free_port` found it free) is tried again on a new port."""
    worker, env_dir = out_dir.parent / "worker.py", out_dir.parent / f"{out_dir.name}-env"
    worker.write_text(_WORKER)
    env_dir.mkdir()
    logs = [out_dir.parent / f"{out_dir.name}-agent{i}.log" for i in range(len(launches))]
    for _ in range(3):
        port = str(_free_port())
        run = [sys.executable, "-m", "torch.distributed.run"]
        argvs = [[*run, *(a.replace("PORT", port) for a in launch), str(worker), str(env_dir), *ARGS,
                  "--run.out_dir", str(out_dir), *extra] for launch in launches]  # fmt: skip
        codes = _agents(argvs, logs)
        if codes == [0] * len(launches) or any(env_dir.iterdir()):
            break
    assert codes == [0] * len(launches), "\n".join(log.read_text()[-3000:] for log in logs)
    return [json.loads((env_dir / f"env{r}.json").read_text()) for r in range(2)]


def _two_nodes(out_dir: Path, *extra: str) -> list[dict[str, int]]:
    # As on a cluster, one agent hosts the rendezvous store, and the agents take group ranks in the order they join.
    launch = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:PORT",
              "--rdzv-id", "test-multinode"]  # fmt: skip
    launches = [[*launch, "--rdzv-conf", f"is_host={int(i == 0)}"] for i in range(2)]
    return _torchrun(launches, out_dir, *extra)


def _losses(run_dir: Path) -> list[str]:
    return [row["loss"] for row in csv.DictReader((run_dir / "metrics.csv").open())]


def _assert_same_state(got: dict, expected: dict) -> None:
    assert got["step"] == expected["step"] and got["data"] == expected["data"]
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), key
    for name, value in expected["optimizer"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got["optimizer"]["state"][name][moment], value[moment]), (name, moment)


def test_two_nodes_train_and_resume_like_one_node(tmp_path):
    nodes = _two_nodes(tmp_path / "nodes")
    # Two machines with one process each: the GPU index (LOCAL_RANK) is 0 on both, the global RANK is not.
    assert [(e["RANK"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"], e["GROUP_WORLD_SIZE"]) for e in nodes] == \
        [(0, 0, 1, 2), (1, 0, 1, 2)]  # fmt: skip
    assert sorted(e["GROUP_RANK"] for e in nodes) == [0, 1] and all(e["WORLD_SIZE"] == 2 for e in nodes)
    one = _torchrun([["--standalone", "--nproc-per-node", "2"]], tmp_path / "one")
    assert [(e["RANK"], e["LOCAL_RANK"], e["GROUP_WORLD_SIZE"]) for e in one] == [(0, 0, 1), (1, 1, 1)]

    # The same global batch in the same rank order: bit-identical runs.
    final = run_state.load_checkpoint(run_state.checkpoint_dir(tmp_path / "nodes", 4))
    _assert_same_state(final, run_state.load_checkpoint(run_state.checkpoint_dir(tmp_path / "one", 4)))
    assert len(_losses(tmp_path / "nodes")) == 4 and _losses(tmp_path / "nodes") == _losses(tmp_path / "one")
    start = run_state.load_checkpoint(run_state.checkpoint_dir(tmp_path / "nodes", 2))["model"]
    assert any(not torch.equal(start[k], v) for k, v in final["model"].items())  # steps 3 and 4 moved the weights
    assert sorted(p.name for p in (tmp_path / "nodes").iterdir()) == \
        ["checkpoints", "config.yaml", "curves.png", "curves.svg", "metrics.csv", "model"]  # fmt: skip

    # Steps 3 and 4 again on two machines, from the step-2 checkpoint of the two-machine run.
    _two_nodes(tmp_path / "resumed", "--run.resume", str(run_state.checkpoint_dir(tmp_path / "nodes", 2)))
    _assert_same_state(run_state.load_checkpoint(run_state.checkpoint_dir(tmp_path / "resumed", 4)), final)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "nodes")[2:]


def test_device_follows_local_rank_and_main_global_rank(monkeypatch):
    """On the second machine (RANK 1, LOCAL_RANK 0) the process takes GPU 0 and is not main."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(device))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist = distributed.setup_distributed("cuda")
    assert (dist.rank, dist.world_size, dist.device, dist.main) == (1, 2, torch.device("cuda", 0), False)
    assert calls == [torch.device("cuda", 0), "nccl"]
    calls.clear()
    assert distributed.setup_distributed("cpu").device == torch.device("cpu") and calls == ["gloo"]


def _agree(rank: int, port: int, values: list[float], out: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo")
    try:
        Path(out, f"same{rank}").write_text(str(distributed.same_everywhere(values[rank])))
    finally:
        torch.distributed.destroy_process_group()


def test_same_everywhere(tmp_path):
    assert distributed.same_everywhere(3)  # one process
    for values, expected in (([7, 7], "True"), ([7, 5], "False")):
        # fork: the children reuse this process's imports
        torch.multiprocessing.start_processes(_agree, args=(_free_port(), values, str(tmp_path)), nprocs=2,
                                             start_method="fork")  # fmt: skip
        assert [(tmp_path / f"same{r}").read_text() for r in (0, 1)] == [expected] * 2
