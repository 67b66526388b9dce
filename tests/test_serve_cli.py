"""`clipworks serve`: options, the model check, and the real server in a subprocess answering a search."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(the --model argument of a saved tiny model, the directory of an index of 20 vectors embedded with it)."""
    from test_serve_helpers import tiny_model

    import clipworks
    from clipworks.search.index import build_index
    from clipworks.search.store import model_id, write_embeddings

    tmp = tmp_path_factory.mktemp("saved")
    model, _, _ = tiny_model()
    clipworks.save_pretrained(model, tmp / "model")
    model_arg = f"local-dir:{tmp / 'model'}"
    vectors = np.random.default_rng(0).standard_normal((20, model.config.embed_dim))
    write_embeddings(tmp / "emb", vectors, [{"key": f"k{i}"} for i in range(20)], model=model_id(model_arg, None))
    build_index(tmp / "emb", tmp / "index", kind="flat")
    return model_arg, tmp / "index"


def test_serve_command_refuses_an_index_of_another_model(saved, capsys):
    from clipworks.cli import main

    model_arg, index = saved
    assert main(["serve", "--index", str(index), "--model", "ViT-B-32", "--port", "1"]) == 2
    assert f"built with model {model_arg!r}, not 'ViT-B-32'" in capsys.readouterr().err


def test_serve_command_refuses_a_preset_without_weights(tmp_path, capsys):
    from clipworks.cli import main
    from clipworks.search.index import build_index
    from clipworks.search.store import write_embeddings

    vectors = np.random.default_rng(0).standard_normal((5, 512))
    write_embeddings(tmp_path / "emb", vectors, [{"key": f"k{i}"} for i in range(5)], model="ViT-B-32")
    build_index(tmp_path / "emb", tmp_path / "index", kind="flat")
    # the index says ViT-B-32, and so does --model: yet a fresh random init is not the model that embedded it
    assert main(["serve", "--index", str(tmp_path / "index"), "--model", "ViT-B-32", "--port", "1"]) == 2
    assert "random initialisation, new on every run" in capsys.readouterr().err


def test_serve_command_options_become_settings():
    from clipworks.cli import build_parser
    from clipworks.serve.commands import settings_from_args

    args = build_parser().parse_args(["serve", "--index", "i", "--model", "m", "--max-k", "7", "--max-body-mb", "0.5",
                                      "--concurrency", "2", "--allow-urls", "--image-root", "/data", "--max-batch", "8",
                                      "--url-timeout", "3", "--queue", "9", "--queue-timeout", "2.5",
                                      "--header-timeout", "4", "--keep-alive-timeout", "6", "--max-connections", "50"])  # fmt: skip
    s = settings_from_args(args)
    assert (s.max_k, s.max_body_bytes, s.concurrency, s.allow_urls) == (7, 512 * 1024, 2, True)
    assert (s.max_batch, s.url_timeout_s, s.queue, s.queue_timeout_s) == (8, 3.0, 9, 2.5)
    assert (s.header_timeout_s, s.keep_alive_s, s.max_connections) == (4.0, 6.0, 50)
    assert [str(r) for r in s.image_roots] == ["/data"]
    with pytest.raises(ValueError, match="concurrency"):
        settings_from_args(build_parser().parse_args(["serve", "--index", "i", "--model", "m", "--concurrency", "0"]))


def test_serve_command_runs_a_server(saved):
    """The whole command: a saved tiny model, an index embedded with it, a search over HTTP."""
    import httpx

    model_arg, index = saved
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "clipworks.cli", "serve", "--index", str(index), "--model", model_arg,
           "--port", str(port), "--max-k", "5", "--precision", "int8"]  # fmt: skip
    server = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        health = _wait_for(f"http://127.0.0.1:{port}/api/health", server)
        assert health["images"] == 20 and health["max_k"] == 5 and health["model"] == model_arg and health["int8"]
        assert health["precision"] == "int8"
        r = httpx.post(f"http://127.0.0.1:{port}/api/search/text", json={"query": "a cat", "k": 5}, timeout=30)
        assert r.status_code == 200 and len(r.json()["results"]) == 5
        assert httpx.post(f"http://127.0.0.1:{port}/api/search/text", json={"query": "a", "k": 6}).status_code == 422
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for(url: str, server: subprocess.Popen) -> dict:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"clipworks serve exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            return httpx.get(url, timeout=2).raise_for_status().json()
        except httpx.HTTPError:
            time.sleep(0.1)
    pytest.fail("clipworks serve did not answer within 60 s")


def test_named_index_specs():
    from clipworks.serve.commands import _default_name, named_specs

    assert named_specs(["photos=/data/idx", "/data/other", "milvus:http://h:1?collection=c", "a=b=c"]) == [
        ("photos", "/data/idx"), (None, "/data/other"), (None, "milvus:http://h:1?collection=c"), ("a", "b=c")]
    assert _default_name("/data/my index/") == "my_index"
    assert _default_name("lancedb:/data/db?table=art") == "db"


def _serve(args: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "clipworks.cli", "serve", "--port", str(port), "--no-access-log", *args]
    server = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True)
    return server, f"http://127.0.0.1:{port}"


def test_serve_command_with_two_collections_and_their_manifests_models(saved, tmp_path):
    """No --model: each collection's model is the one its manifest names (here the same saved model, loaded once)."""
    import httpx

    from clipworks.search.index import build_index
    from clipworks.search.store import write_embeddings

    model_arg, index = saved
    vectors = np.random.default_rng(1).standard_normal((8, 24))
    records = [{"key": f"x{i}", "year": 2000 + i} for i in range(8)]
    write_embeddings(tmp_path / "emb", vectors, records, model=model_arg)
    build_index(tmp_path / "emb", tmp_path / "second", kind="flat")
    server, url = _serve(["--index", f"first={index}", "--index", str(tmp_path / "second"), "--no-safety"])
    try:
        health = _wait_for(f"{url}/api/health", server)
        assert health["collections"] == ["first", "second"] and health["models"] == [model_arg]
        assert health["safety"] is False
        r = httpx.post(f"{url}/api/search/text", timeout=30,
                       json={"query": "a cat", "k": 3, "collection": "second", "filters": "year>=2005"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert sorted(x["key"] for x in r.json()["results"]) == ["x5", "x6", "x7"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_command_with_a_model_alone_serves_embeddings(saved):
    import httpx

    model_arg, _ = saved
    server, url = _serve(["--model", model_arg])
    try:
        assert _wait_for(f"{url}/v1/models", server)["data"][0]["id"] == model_arg
        r = httpx.post(f"{url}/v1/embeddings", json={"model": model_arg, "input": ["a", "b"]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["data"]) == 2
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_command_needs_an_index_or_a_model(capsys):
    from clipworks.cli import main

    assert main(["serve", "--port", "1"]) == 2
    assert "give --index" in capsys.readouterr().err
