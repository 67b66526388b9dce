"""CLIP_benchmark's exports fetched from the hub (hf-hub:clip-benchmark/wds_NAME) through a fake hub on 127.0.0.1:
only the metadata and the test split are fetched, into the hub cache, checked, reused offline; offline without them
the error says what to fetch; `clipworks benchmark --download` reads them by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fakehub import serving
from huggingface_hub import constants
from reference import tiny_config
from test_benchmark import _bench, _wds_export

import clipworks
from clipworks import hub
from clipworks.eval import sources
from clipworks.eval.datasets.wds_benchmark import fetch_export

REPO = "clip-benchmark/wds_vtab-cifar10"
KEY = f"datasets/{REPO}"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict[str, bytes]:
    """The files of a classification export, plus a train split and a README that a test-split fetch must skip."""
    root = tmp_path_factory.mktemp("export") / "wds_vtab-cifar10"
    _wds_export(root)
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    return files | {"train/nshards.txt": b"1\n", "train/0.tar": files["test/0.tar"], "README.md": b"# cifar10"}


@pytest.fixture
def fake(monkeypatch, tmp_path, export):
    with serving(monkeypatch, tmp_path / "home") as server:
        server.add_repo(REPO, export, repo_type="dataset")
        yield server


def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _fetched(server) -> list[str]:
    prefix = f"/{KEY}/resolve/"
    return sorted(r.path.split("/", 6)[-1] for r in server.requests if r.method == "GET" and r.path.startswith(prefix))


def test_fetch_export_gets_the_metadata_and_the_test_split_only(fake, export):
    root = fetch_export(REPO)
    assert _fetched(fake) == ["classnames.txt", "test/0.tar", "test/nshards.txt", "zeroshot_classification_templates.txt"]
    assert (root / "test" / "0.tar").read_bytes() == export["test/0.tar"]
    assert not (root / "train").exists() and not (root / "README.md").exists()
    assert str(root).startswith(str(Path(constants.HF_HUB_CACHE)))  # the hub's cache, not a folder of ours
    requests = len(fake.requests)
    assert fetch_export(REPO) == root
    assert not [r for r in fake.requests[requests:] if r.method == "GET" and "/resolve/" in r.path]  # no refetch


def test_a_hub_export_reads_as_the_same_export_in_a_folder(fake, tmp_path, export):
    for name, data in export.items():
        (tmp_path / "local" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "local" / name).write_bytes(data)
    remote = sources.load_classification(f"wds-benchmark:hf-hub:{REPO}")
    local = sources.load_classification(f"wds-benchmark:{tmp_path / 'local'}")
    assert (remote.labels, remote.class_names, remote.templates) == (local.labels, local.class_names, local.templates)
    assert [remote.images.load(i).tobytes() for i in range(len(remote.labels))] == \
        [local.images.load(i).tobytes() for i in range(len(local.labels))]  # fmt: skip


def test_offline_reuses_the_cache_and_without_it_says_what_to_fetch(fake, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(hub.HubUnavailableError, match="offline mode") as e:
        fetch_export(REPO)
    assert f"huggingface-cli download {REPO} --repo-type dataset" in str(e.value) and "'test/*'" in str(e.value)
    assert "\n" not in str(e.value) and not fake.requests
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    root = fetch_export(REPO)
    _offline(monkeypatch)
    requests = len(fake.requests)
    assert fetch_export(REPO) == root and len(fake.requests) == requests


def test_a_corrupt_shard_is_refused_and_evicted(fake):
    fake.corrupt(KEY, "test/0.tar")
    with pytest.raises(hub.ChecksumError, match="test/0.tar"):
        fetch_export(REPO)
    assert not list(Path(constants.HF_HUB_CACHE).rglob("0.tar"))


def test_benchmark_download_reads_a_dataset_by_name_from_the_hub(fake, tmp_path, export):
    torch.manual_seed(0)
    model = tmp_path / "m0"
    clipworks.save_pretrained(clipworks.create_model(tiny_config(clipworks.get_preset("ViT-B-32"))), model)
    (tmp_path / "datasets").mkdir()  # the root lacks the export
    code, _, err = _bench(tmp_path, tmp_path / "a", models=f"local-dir:{model}", datasets="vtab/cifar10")
    assert code == 1 and "--download" in err and len(err.strip().splitlines()) == 1
    code, out, err = _bench(tmp_path, tmp_path / "a", "--download", models=f"local-dir:{model}",
                            datasets="vtab/cifar10")  # fmt: skip
    assert code == 0, err
    _wds_export(tmp_path / "datasets" / "wds_vtab-cifar10")  # the same export, now under the root
    code, _, err = _bench(tmp_path, tmp_path / "b", models=f"local-dir:{model}", datasets="vtab/cifar10")
    assert code == 0, err
    (a,), (b,) = ([json.loads(p.read_text()) for p in (tmp_path / d / "cells").glob("*.json")] for d in "ab")
    assert a["dataset"] == b["dataset"] == "vtab/cifar10" and a["metrics"] == b["metrics"]


# --- an export at a URL (the eval side of streamed shards) ---


def test_an_export_at_a_url_is_fetched_once_retrying_a_dropped_connection(export, tmp_path, monkeypatch):
    from clipworks.data import shards
    from clipworks.eval.datasets import wds_benchmark

    monkeypatch.setattr(wds_benchmark, "REMOTE_CACHE", tmp_path / "cache")
    monkeypatch.setattr(shards, "RETRY_DELAY_S", 0.01)
    srv = _http(tmp_path)
    try:
        srv.files.update({f"/exp/{name}": data for name, data in export.items()})
        srv.faults["/exp/test/0.tar"] = ["drop"]
        remote = sources.load_classification(f"wds-benchmark:{srv.url}/exp")
        for name, data in export.items():
            (tmp_path / "local" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "local" / name).write_bytes(data)
        local = sources.load_classification(f"wds-benchmark:{tmp_path / 'local'}")
        assert (remote.labels, remote.class_names, remote.templates) == (local.labels, local.class_names,
                                                                         local.templates)  # fmt: skip
        assert srv.requests["/exp/test/0.tar"] == 2 and srv.requests["/exp/dataset_type.txt"] == 1  # absent: 404
        assert "/exp/train/0.tar" not in srv.requests  # the split asked for only
        before = sum(srv.requests.values())
        sources.load_classification(f"wds-benchmark:{srv.url}/exp")
        assert sum(srv.requests.values()) == before  # read from the cache
        assert not list((tmp_path / "cache").rglob(".*.part"))
    finally:
        srv.shutdown()


def _http(tmp_path):
    """A file server on 127.0.0.1 with the fault injection of tests/test_wds_stream.py."""
    import http.server
    import threading
    from collections import Counter

    from test_wds_stream import _Handler

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.faults, srv.always, srv.requests = {}, {}, {}, Counter()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv
