"""Hub downloads against a fake hub on 127.0.0.1: caching, offline use, interrupted transfers, checksums."""

import io
import json
import socket
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

import clipworks
from clipworks import hub, pretrained
from clipworks.checkpoints.io import load_state_dict
from clipworks.checkpoints.open_clip import convert_from_open_clip, convert_to_open_clip
from clipworks.checkpoints.transformers import config_to_transformers, convert_to_transformers
from clipworks.models.clip import CLIP
from fakehub import serving
from reference import perturb_, tiny_config

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402
from huggingface_hub.errors import RemoteEntryNotFoundError  # noqa: E402

CFG = tiny_config(clipworks.get_preset("ViT-B-32"))
HF_REPO, OC_REPO = "test/clip-hf", "test/clip-open_clip"


def _model(cfg=CFG) -> CLIP:
    torch.manual_seed(0)
    model = CLIP(cfg)
    perturb_(model)
    return model


def _pickled(sd) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny():
    """A tiny random model in the transformers and the OpenCLIP layouts, as file contents."""
    model = _model()
    hf_sd = {k: v.contiguous() for k, v in convert_to_transformers(model.state_dict()).items()}
    oc_sd = {k: v.contiguous() for k, v in convert_to_open_clip(model.state_dict(), CFG).items()}
    return {
        "model": model,
        "config.json": json.dumps(config_to_transformers(CFG)).encode(),
        "model.safetensors": safetensors_bytes(hf_sd),
        "pytorch_model.bin": _pickled(hf_sd),
        "open_clip_config.json": json.dumps({"model_cfg": {}, "preprocess_cfg": {}}).encode(),
        "open_clip_model.safetensors": safetensors_bytes(oc_sd),
        "open_clip_pytorch_model.bin": _pickled(oc_sd),
    }


@pytest.fixture
def fake(monkeypatch, tmp_path, tiny):
    with serving(monkeypatch, tmp_path / "home") as server:
        server.add_repo(HF_REPO, {k: tiny[k] for k in ("config.json", "model.safetensors")} | {"README.md": b"# x"})
        yield server


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _cached_files(cache):
    """Every file and link in the cache outside the bookkeeping folders (refs, locks, markers)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")
                  if (p.is_file() or p.is_symlink()) and ("blobs" in p.parts or "snapshots" in p.parts))  # fmt: skip


def test_no_request_leaves_loopback(fake):
    from huggingface_hub.utils import get_session

    assert constants.ENDPOINT.startswith("http://127.0.0.1:")
    with pytest.raises(RuntimeError, match="only the fake hub"):
        get_session().get("https://huggingface.co/api/models/openai/clip-vit-base-patch32")


def test_download_is_cached_and_reused(fake, cache, tiny):
    path = hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache)
    assert path.read_bytes() == tiny["model.safetensors"]
    assert len(fake.gets(HF_REPO, "model.safetensors")) == 1
    again = hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache)
    assert again == path and len(fake.gets(HF_REPO, "model.safetensors")) == 1  # checked by HEAD, not fetched
    config = hub.download_file(HF_REPO, "config.json", cache_dir=cache)  # a git-stored file: no LFS hash
    assert json.loads(config.read_text()) == json.loads(tiny["config.json"])


def test_a_verified_blob_is_not_hashed_again(fake, cache, monkeypatch):
    path = hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache)

    def no_hashing(*args, **kwargs):
        raise AssertionError("a verified file was hashed again")

    monkeypatch.setattr(hub, "sha256_file", no_hashing)
    assert hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache) == path


def test_download_repo_gives_a_loadable_transformers_checkpoint(fake, cache, tiny):
    folder = hub.download_repo(HF_REPO, cache_dir=cache)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    model = clipworks.create_model(f"local-dir:{folder}")
    for (name, ours), theirs in zip(model.state_dict().items(), tiny["model"].state_dict().values()):
        torch.testing.assert_close(ours, theirs, msg=name)


@pytest.mark.parametrize("layout", ["transformers", "sharded", "open_clip"])
def test_download_repo_fetches_one_weights_file_preferring_safetensors(fake, cache, tiny, layout):
    hf = {"config.json": tiny["config.json"], "preprocessor_config.json": b"{}", "README.md": b"# x"}
    oc = {"open_clip_config.json": tiny["open_clip_config.json"]}
    shard = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    repos = {
        "transformers": ({**hf, "model.safetensors": b"s" * 64, "pytorch_model.bin": b"p" * 64},
                         {"config.json", "preprocessor_config.json", "model.safetensors"}),
        "sharded": ({**hf, "model.safetensors.index.json": json.dumps(shard).encode(),
                     "model-00001-of-00002.safetensors": b"1" * 64, "model-00002-of-00002.safetensors": b"2" * 64,
                     "pytorch_model.bin": b"p" * 64},
                    {"config.json", "preprocessor_config.json", "model.safetensors.index.json",
                     "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}),
        # timm's repos: OpenCLIP's files next to a timm config.json and image-only model.safetensors
        "open_clip": ({**hf, **oc, "model.safetensors": b"t" * 64, "open_clip_model.safetensors": b"s" * 64,
                       "open_clip_pytorch_model.bin": b"p" * 64},
                      {"open_clip_config.json", "open_clip_model.safetensors"}),
    }  # fmt: skip
    files, expected = repos[layout]
    fake.add_repo("test/layout", files)
    folder = hub.download_repo("test/layout", cache_dir=cache)
    assert {p.name for p in folder.iterdir()} == expected
    fetched = {r.path.rsplit("/", 1)[-1] for r in fake.requests if "/resolve/" in r.path}
    assert fetched == expected  # nothing else was even asked for


def test_download_repo_without_a_checkpoint_lists_the_files(fake, cache):
    fake.add_repo("test/empty", {"README.md": b"# nothing", "weights.npz": b"x"})
    with pytest.raises(ValueError, match=r"no CLIP checkpoint.*README\.md.*weights\.npz"):
        hub.download_repo("test/empty", cache_dir=cache)


def test_missing_file_is_the_hubs_not_found_error(fake, cache):
    with pytest.raises(RemoteEntryNotFoundError):
        hub.download_file(HF_REPO, "nope.safetensors", cache_dir=cache)


def test_offline_uses_the_cache_and_sends_nothing(fake, cache, monkeypatch, tiny):
    path = hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache)
    folder = hub.download_repo(HF_REPO, cache_dir=cache)
    _offline(monkeypatch)
    sent = len(fake.requests)
    assert hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache) == path
    assert hub.download_repo(HF_REPO, cache_dir=cache) == folder
    assert len(fake.requests) == sent


def test_offline_without_the_cache_names_repo_and_file(fake, cache, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(hub.HubUnavailableError, match=r"'model\.safetensors' of 'test/clip-hf'.*offline"):
        hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache)
    with pytest.raises(hub.HubUnavailableError, match=r"checkpoint of 'test/clip-hf'.*offline"):
        hub.download_repo(HF_REPO, cache_dir=cache)
    assert fake.requests == []


def test_unreachable_hub_falls_back_to_the_cache(fake, cache, monkeypatch):
    path = hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache)
    folder = hub.download_repo(HF_REPO, cache_dir=cache)
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    assert hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache) == path
    assert hub.download_repo(HF_REPO, cache_dir=cache) == folder
    with pytest.raises(hub.HubUnavailableError, match=r"'config\.json' of 'test/other'.*could not be reached"):
        hub.download_file("test/other", "config.json", cache_dir=cache)
    with pytest.raises(hub.HubUnavailableError, match=r"checkpoint of 'test/other'.*could not be reached"):
        hub.download_repo("test/other", cache_dir=cache)


def test_interrupted_transfer_resumes_where_it_stopped(fake, cache, tiny):
    fake.fail(HF_REPO, "model.safetensors", "truncate")
    path = hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache)
    assert path.read_bytes() == tiny["model.safetensors"]
    first, resumed = fake.gets(HF_REPO, "model.safetensors")
    # huggingface_hub keeps what it received in whole chunks (64 KiB here) and asks for the rest
    resumed_at = int(resumed.range.removeprefix("bytes=").removesuffix("-"))
    assert first.range is None and 0 < resumed_at <= len(tiny["model.safetensors"]) // 2
    assert not list(cache.rglob("*.incomplete"))


@pytest.mark.parametrize("faults", [["truncate"] + ["drop"] * 6, ["short"]], ids=["connection-lost", "short-body"])
def test_failed_transfer_caches_nothing_and_a_retry_completes(fake, cache, monkeypatch, tiny, faults):
    fake.fail(HF_REPO, "model.safetensors", *faults)
    with pytest.raises(hub.DownloadError, match=r"model\.safetensors from 'test/clip-hf' failed"):
        hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache)
    assert _cached_files(cache) == []  # no blob, no snapshot entry, no partial file
    fake.faults.clear()
    with monkeypatch.context() as m:
        _offline(m)
        with pytest.raises(hub.HubUnavailableError):
            hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache)
    path = hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache)
    assert path.read_bytes() == tiny["model.safetensors"]


def test_content_not_matching_the_hubs_sha256_is_refused_and_evicted(fake, cache, monkeypatch, tiny):
    fake.corrupt(HF_REPO, "model.safetensors")
    advertised = fake.repos[HF_REPO].files["model.safetensors"].etag
    with pytest.raises(hub.ChecksumError, match=rf"model\.safetensors .* the hub's LFS SHA-256 is {advertised}"):
        hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache)
    assert _cached_files(cache) == []
    with monkeypatch.context() as m:
        _offline(m)
        with pytest.raises(hub.HubUnavailableError):
            hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache)
    fake.repos[HF_REPO].files["model.safetensors"].served = None  # the hub is fixed: a retry works
    assert hub.download_file(HF_REPO, "model.safetensors", cache_dir=cache).read_bytes() == tiny["model.safetensors"]


def test_a_given_sha256_is_checked_on_download_and_on_cached_copies(fake, cache, tiny):
    wrong, right = "0" * 64, fake.repos[HF_REPO].files["model.safetensors"].etag
    with pytest.raises(hub.ChecksumError, match=f"the expected SHA-256 is {wrong}"):
        hub.download_file(HF_REPO, "model.safetensors", sha256=wrong, cache_dir=cache)
    assert _cached_files(cache) == []
    hub.download_file(HF_REPO, "model.safetensors", sha256=right.upper(), cache_dir=cache)
    with pytest.raises(hub.ChecksumError):  # a cached copy is no excuse
        hub.download_file(HF_REPO, "model.safetensors", sha256=wrong, cache_dir=cache)
    assert _cached_files(cache) == []
    with pytest.raises(ValueError, match="64 hexadecimal"):
        hub.download_file(HF_REPO, "model.safetensors", sha256="abc", cache_dir=cache)


@pytest.fixture
def registered(monkeypatch):
    """Point the registry's ViT-B-32 "openai" entry at the fake hub."""
    key = ("ViT-B-32", "openai")
    entry = replace(pretrained._ENTRIES[key], hf_hub=OC_REPO)
    monkeypatch.setitem(pretrained._ENTRIES, key, entry)
    return entry


def test_resolve_pretrained_downloads_the_registered_file(fake, cache, tiny, registered):
    fake.add_repo(OC_REPO, {k: tiny[k] for k in ("open_clip_config.json", "open_clip_model.safetensors",
                                                  "open_clip_pytorch_model.bin")})  # fmt: skip
    path, entry = hub.resolve_pretrained("ViT-B-32", "openai", cache_dir=cache)
    assert entry == registered and path.name == "open_clip_model.safetensors"
    assert fake.gets(OC_REPO, "open_clip_pytorch_model.bin") == []
    model = CLIP(CFG)
    model.load_state_dict(convert_from_open_clip(load_state_dict(path), CFG))
    torch.testing.assert_close(model.state_dict(), tiny["model"].state_dict())


def test_resolve_pretrained_checks_the_registry_sha256(fake, cache, tiny, registered, monkeypatch):
    fake.add_repo(OC_REPO, {"open_clip_model.safetensors": tiny["open_clip_model.safetensors"]})
    monkeypatch.setitem(pretrained._ENTRIES, ("ViT-B-32", "openai"), replace(registered, sha256="1" * 64))
    with pytest.raises(hub.ChecksumError, match="open_clip_model.safetensors"):
        hub.resolve_pretrained("ViT-B-32", "openai", cache_dir=cache)
    assert _cached_files(cache) == []


def test_resolve_pretrained_falls_back_to_pickled_weights(fake, cache, tiny, registered, monkeypatch):
    fake.add_repo(OC_REPO, {"open_clip_pytorch_model.bin": tiny["open_clip_pytorch_model.bin"]})
    path, _ = hub.resolve_pretrained("ViT-B-32", "openai", cache_dir=cache)
    assert path.name == "open_clip_pytorch_model.bin"
    _offline(monkeypatch)  # offline, only the fallback is cached: it is used
    assert hub.resolve_pretrained("ViT-B-32", "openai", cache_dir=cache)[0] == path


def test_resolve_pretrained_offline_without_cache_names_the_preferred_file(fake, cache, registered, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(hub.HubUnavailableError, match=r"'open_clip_model\.safetensors' of 'test/clip-open_clip'"):
        hub.resolve_pretrained("ViT-B-32", "openai", cache_dir=cache)


def test_missing_huggingface_hub_says_which_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'clipworks\[hub\]'"):
        hub.download_file(HF_REPO, "config.json")
