"""Streamed WebDataset shards (issue 19): http(s) and S3 through fsspec, `pipe:`, retries, skipped shards, mixtures,
resampling, epochs of a set size and exact resume. Every server runs on 127.0.0.1."""

from __future__ import annotations

import http.server
import io
import itertools
import socket
import tarfile
import threading
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipworks.config import PreprocessConfig
from clipworks.data.datasets import ShardError, StreamOptions, build_dataset, make_loader, parse_data_spec
from clipworks.data.wds import expand_sources
from clipworks.transforms import image_transform

TRANSFORM = image_transform(PreprocessConfig(image_size=16))
PER_SHARD = 8
FAST = dict(retry_delay_s=0.01)  # backoff in tests: 10 ms, doubling


def ids(captions: list[str]) -> torch.Tensor:
    """A "tokenizer" that keeps the sample id: "caption N" -> N."""
    return torch.tensor([int(c.split()[-1]) for c in captions], dtype=torch.long)


def _png(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, 40, 90)).save(out, "PNG")
    return out.getvalue()


def _shard(start: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i in range(start, start + PER_SHARD):
            for name, data in ((f"{i:05d}.png", _png(i)), (f"{i:05d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


# Source "a": shards a-0..a-5 hold samples 0..47; source "b": shards b-0..b-2 hold samples 1000..1023.
SHARDS = {f"a-{s}.tar": _shard(PER_SHARD * s) for s in range(6)} | {
    f"b-{s}.tar": _shard(1000 + PER_SHARD * s) for s in range(3)
}
A_IDS = list(range(48))


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    for name, data in SHARDS.items():
        (root / name).write_bytes(data)
    return root


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET of the server's `files`; `faults[path]` lists what the next requests of a path get: "drop" (half the
    body, then the connection is shut) or an HTTP status; `always[path]` is a status every request gets."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.requests[self.path] += 1
        data, faults = srv.files.get(self.path), srv.faults.get(self.path)
        fault = faults.pop(0) if faults else srv.always.get(self.path)
        if data is None or isinstance(fault, int):
            self.send_error(404 if data is None else fault)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "drop":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files = {f"/{name}": data for name, data in SHARDS.items()}
    srv.faults, srv.always, srv.requests = {}, {}, Counter()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


@pytest.fixture
def http_server(server):
    server.faults.clear()
    server.always.clear()
    server.requests.clear()
    return server


def _samples(spec: str, stream: StreamOptions | None = None, **kw) -> list[int]:
    kw = {"batch_size": 4, "workers": 0, "shuffle": False, "drop_last": False, **kw}
    loader = make_loader(spec, TRANSFORM, ids, stream=stream, **kw)
    return [i for batch in loader for i in batch.tokens.tolist()]


def _batches(spec: str, stream: StreamOptions | None = None, **kw) -> list[list[int]]:
    kw = {"batch_size": 4, "workers": 0, "shuffle_buffer": 16, "seed": 3, **kw}
    return [b.tokens.tolist() for b in make_loader(spec, TRANSFORM, ids, stream=stream, **kw)]


# --- where shards come from ------------------------------------------------------------------------------------


def test_http_shards_read_as_local_ones(local, http_server):
    url = _samples(f"wds:{http_server.url}/a-{{0..5}}.tar")
    assert url == _samples(f"wds:{local}/a-{{0..5}}.tar") == A_IDS


def test_s3_shards_through_an_s3_compatible_server(monkeypatch):
    boto3 = pytest.importorskip("boto3")
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        endpoint = "http://%s:%d" % moto.get_host_and_port()
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN":
                           "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                           "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
            monkeypatch.setenv(key, value)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="shards")
        for s in range(3):
            client.put_object(Bucket="shards", Key=f"train/b-{s}.tar", Body=SHARDS[f"b-{s}.tar"])
        s3fs.S3FileSystem.clear_instance_cache()  # a file system made before the variables were set is not reused
        assert _samples("wds:s3://shards/train/b-{0..2}.tar") == list(range(1000, 1024))
        with pytest.warns(UserWarning, match="FileNotFoundError"):  # missing objects fail when read, not up front
            got = _samples("wds:s3://shards/train/b-{0..3}.tar", StreamOptions(**FAST))
        assert got == list(range(1000, 1024))
    finally:
        moto.stop()


def test_pipe_reads_a_commands_output_and_a_failing_command_is_an_error(local):
    assert _samples(f"wds:pipe:cat {local}/a-{{0..1}}.tar") == list(range(16))
    stream = StreamOptions(shard_retries=1, **FAST)
    with pytest.warns(UserWarning, match="exited with status 3"):
        # the samples come once, though the command's exit status makes it fail (and be retried) after them
        got = _samples(f"wds:pipe:cat {local}/a-0.tar; exit 3::{local}/a-1.tar", stream)
    assert got == list(range(16))


def test_a_url_keeps_its_query_and_sources_split_on_double_colons(local):
    spec = parse_data_spec("wds:https://host/a-{0..1}.tar?sig=x&t=1")
    assert spec.path == "https://host/a-{0..1}.tar?sig=x&t=1"
    with pytest.raises(ValueError, match="takes: none"):
        parse_data_spec(f"wds:{local}/a-0.tar?x=1")
    dataset = build_dataset(f"wds:{local}/a-{{0..1}}.tar::{local}/b-0.tar", TRANSFORM)
    assert [Path(s).name for s in dataset.shards] == ["a-0.tar", "a-1.tar", "b-0.tar"]
    assert expand_sources("http://[::1]:80/a-{0..1}.tar::pipe:cat b.tar") == [
        ["http://[::1]:80/a-0.tar", "http://[::1]:80/a-1.tar"], ["pipe:cat b.tar"]]  # fmt: skip
    with pytest.raises(FileNotFoundError, match="1 of 2 shards not found"):  # local shards: checked up front
        build_dataset(f"wds:{local}/a-0.tar::{local}/missing.tar", TRANSFORM)


# --- retries and skipped shards ----------------------------------------------------------------------------------


def test_connections_dropped_mid_shard_yield_every_sample_once(http_server):
    for s in range(6):
        http_server.faults[f"/a-{s}.tar"] = ["drop", "drop"] if s % 2 else [503, "drop"]
    got = _samples(f"wds:{http_server.url}/a-{{0..5}}.tar", StreamOptions(**FAST), workers=2, shuffle=True)
    assert Counter(got) == Counter(A_IDS)
    assert all(http_server.requests[f"/a-{s}.tar"] == 3 for s in range(6))


def test_a_shard_that_always_fails_is_skipped_and_counted(http_server):
    http_server.always["/a-2.tar"] = 503
    spec = f"wds:{http_server.url}/a-{{0..5}}.tar::{http_server.url}/missing.tar"
    loader = make_loader(spec, TRANSFORM, ids, batch_size=4, workers=0, shuffle=False, drop_last=False,
                         stream=StreamOptions(shard_retries=2, max_failed_shards=2, **FAST))  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [i for batch in loader for i in batch.tokens.tolist()]
    assert got == [i for i in A_IDS if i // PER_SHARD != 2]
    assert http_server.requests["/a-2.tar"] == 3 and http_server.requests["/missing.tar"] == 1  # 404: no retry
    assert sorted(loader.dataset.failed.names()) == [f"{http_server.url}/a-2.tar", f"{http_server.url}/missing.tar"]
    assert len(loader.dataset.failed) == 2 and sum("skipped" in str(w.message) for w in caught) == 2


def test_too_many_failing_shards_stop_the_run_naming_them(http_server):
    spec = f"wds:{http_server.url}/gone-{{0..2}}.tar::{http_server.url}/a-0.tar"
    with pytest.raises(ShardError, match=r"3 shards could not be read, more than max_failed_shards=2: .*gone-0"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _samples(spec, StreamOptions(max_failed_shards=2, **FAST), workers=2)


# --- mixtures, resampling, epochs -------------------------------------------------------------------------------


@pytest.mark.parametrize("factors, share_b", [(None, 3 / 9), ("1::4", 4 * 3 / (6 + 4 * 3)), ("1::0", 0.0)])
def test_upsampling_factors_weigh_the_sources(local, factors, share_b):
    stream = StreamOptions(resampled=True, train_num_samples=100, upsampling_factors=factors)
    dataset = build_dataset(f"wds:{local}/a-{{0..5}}.tar::{local}/b-{{0..2}}.tar", TRANSFORM, stream=stream)
    draws = list(itertools.islice(dataset.draws(epoch=0, worker=0, num_workers=1), 20000))
    assert abs(sum("/b-" in d for d in draws) / len(draws) - share_b) < 0.015
    assert draws[:50] == list(itertools.islice(dataset.draws(0, 0, 1), 50))  # a function of (seed, epoch, rank, worker)
    assert draws[:50] != list(itertools.islice(dataset.draws(1, 0, 1), 50))


def test_upsampling_factors_need_resampling_and_one_per_source(local):
    spec = f"wds:{local}/a-0.tar::{local}/b-0.tar"
    with pytest.raises(ValueError, match="need resampled"):
        build_dataset(spec, TRANSFORM, stream=StreamOptions(upsampling_factors="1::2"))
    with pytest.raises(ValueError, match="expected 2 non-negative numbers"):
        build_dataset(spec, TRANSFORM, stream=StreamOptions(True, 10, upsampling_factors="1::2::3"))
    with pytest.raises(ValueError, match="need train_num_samples"):
        build_dataset(spec, TRANSFORM, stream=StreamOptions(resampled=True))


def test_resampled_epochs_have_train_num_samples_and_differ(local):
    spec = f"wds:{local}/a-{{0..5}}.tar::{local}/b-{{0..2}}.tar"
    stream = StreamOptions(resampled=True, train_num_samples=30, upsampling_factors="1::2")
    first = _batches(spec, stream, workers=2)
    assert len(first) == 8 and all(len(b) == 4 for b in first)  # 30 -> 8 batches of 4: 4 per worker
    assert first == _batches(spec, stream, workers=2)
    assert first != _batches(spec, stream, workers=2, epoch=1)


def test_train_num_samples_without_resampling_passes_over_the_shards_again(local):
    got = _samples(f"wds:{local}/a-{{0..5}}.tar", StreamOptions(train_num_samples=100), workers=2, shuffle=True,
                   shuffle_buffer=4)  # fmt: skip
    assert len(got) == 104 and set(got) == set(A_IDS)  # 100 -> 26 batches of 4, 13 per worker: 2 passes and a bit
    assert min(Counter(got).values()) >= 2


@pytest.mark.parametrize("resampled, num_samples", [(False, None), (False, 70), (True, 70)])
def test_resume_at_a_step_continues_exactly(local, resampled, num_samples):
    spec = f"wds:{local}/a-{{0..5}}.tar::{local}/b-{{0..1}}.tar"
    stream = StreamOptions(resampled=resampled, train_num_samples=num_samples)
    full = _batches(spec, stream, workers=2, epoch=2)
    for step in (3, 4):
        assert _batches(spec, stream, workers=2, epoch=2, start_step=step) == full[step:]


# --- the training run and embed ------------------------------------------------------------------------------


def test_training_reads_resampled_http_shards_with_retries(tmp_path, http_server):
    from test_train import tiny_config

    from clipworks.train.loop import train

    http_server.faults["/a-1.tar"] = ["drop"]
    cfg = tiny_config(tmp_path / "run", "--data.train", f"wds:{http_server.url}/a-{{0..3}}.tar", "--run.steps", "3",
                      "--data.resampled", "true", "--data.train_num_samples", "32", "--data.batch_size", "8",
                      "--data.eval_size", "0", "--run.eval_every", "0", "--run.save_every", "0")  # fmt: skip
    result = train(cfg)
    assert (result.run_dir / "metrics.csv").is_file()


def test_embed_reads_streamed_shards_with_retries(local, http_server):
    from clipworks.search.sources import plan_images, plan_texts

    http_server.faults["/a-0.tar"] = ["drop"]
    plan = plan_texts(f"wds:{http_server.url}/a-{{0..1}}.tar::pipe:cat {local}/b-0.tar", 100)
    assert sorted(item.caption for shard in plan.shards for item in shard) == sorted(
        f"caption {i}" for i in list(range(16)) + list(range(1000, 1008)))  # fmt: skip
    images = plan_images(f"wds:{http_server.url}/a-{{0..1}}.tar::{local}/b-0.tar", 100)
    assert images.shards[:2] == [f"{http_server.url}/a-0.tar", f"{http_server.url}/a-1.tar"]
    assert images.roots == [str(local.resolve())]
