"""Loading weights safely and all-or-nothing; the clipworks format; text trimming."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import clipworks
from clipworks.checkpoints.io import CheckpointError, load_state_dict, load_weights
from clipworks.models.clip import CLIP
from reference import tiny_config

CFG = tiny_config(clipworks.get_preset("ViT-B-32"))


class _Payload:
    """Unpickling this writes a marker file: proof of whether a loader ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        clipworks.create_model(CFG, pretrained=path)
    assert not marker.exists()
    # the payload is live: an unsafe loader would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", "RN50-quickgelu"])
def test_torchscript_archive_tensors_are_read_without_running_its_code(name, tmp_path, monkeypatch):
    import warnings

    from reference import open_clip_model, perturb_

    cfg = tiny_config(clipworks.get_preset(name))
    ref = open_clip_model(cfg).eval()
    perturb_(ref)
    path = tmp_path / f"{name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; OpenAI's releases are TorchScript all the same
        torch.jit.save(torch.jit.script(ref), str(path))

    def no_jit(*args, **kwargs):
        raise AssertionError("TorchScript code must not be loaded")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    model = clipworks.create_model(cfg, pretrained=path)
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = clipworks.get_tokenizer("ViT-B-32")(["a cat", "two dogs on a sofa"])
    with torch.no_grad():
        assert (model.encode_image(images, normalize=True) - ref.encode_image(images, normalize=True)).abs().max() <= 1e-5
        assert (model.encode_text(tokens, normalize=True) - ref.encode_text(tokens, normalize=True)).abs().max() <= 1e-5


def test_torchscript_archive_with_a_pickle_payload_is_refused(tmp_path):
    import pickle
    import zipfile

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(_Payload(marker), protocol=2))
        zf.writestr("archive/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n  __buffers__ = []\n")
        zf.writestr("archive/version", "3")
    with pytest.raises(CheckpointError, match="not a tensor or module type"):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 64])
def test_corrupt_safetensors_is_a_clear_error(tmp_path, content):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_state_dict(path)


def _safetensors_with_header(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize(
    "content",
    [
        (2**62).to_bytes(8, "little") + b"{}",  # a header length far past the end of the file
        _safetensors_with_header({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}),
        _safetensors_with_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
        _safetensors_with_header({"w": {"dtype": "EVIL", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    ],
    ids=["huge-header-length", "offsets-past-the-end", "shape-size-mismatch", "unknown-dtype"],
)
def test_hostile_safetensors_headers_are_refused(tmp_path, content):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_state_dict(path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in CLIP(CFG).state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        clipworks.create_model(CFG, pretrained=path)


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=".safetensors"):
        load_state_dict(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "absent.safetensors")


def test_mismatches_are_named_and_nothing_is_half_loaded():
    model = CLIP(CFG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in CLIP(CFG).state_dict().items()}
    sd["text.proj.weight"] = torch.zeros(3, 3)
    del sd["visual.ln_post.bias"]
    sd["visual.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_weights(model, sd)
    msg = str(e.value)
    assert "visual.ln_post.bias" in msg and "visual.extra" in msg and "text.proj.weight" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_wrong_architecture_file_names_the_keys(tmp_path):
    path = tmp_path / "rn.safetensors"
    save_file({k: v.contiguous() for k, v in CLIP(tiny_config(clipworks.get_preset("RN50"))).state_dict().items()},
              str(path))  # fmt: skip
    with pytest.raises(CheckpointError, match="missing keys"):
        clipworks.create_model(CFG, pretrained=path)


def test_pretrained_that_cannot_be_met_is_an_error_never_a_random_model(tmp_path, monkeypatch):
    from clipworks.hub import HubUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"):  # an unknown tag lists the model's tags
        clipworks.create_model("ViT-B-32", pretrained="laion5b_nonexistent")
    with pytest.raises(HubUnavailableError, match="open_clip"):  # offline, nothing cached: names the file
        clipworks.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(HubUnavailableError, match="openai/clip-vit-base-patch32"):
        clipworks.create_model("hf-hub:openai/clip-vit-base-patch32")
    with pytest.raises(FileNotFoundError):
        clipworks.create_model("local-dir:/nonexistent/dir")
    with pytest.raises(ValueError, match="already names its weights"):
        clipworks.create_model("ViT-B-32:openai", pretrained="openai")


def test_clipworks_format_round_trip(tmp_path):
    torch.manual_seed(0)
    model = clipworks.create_model(CFG)
    pp = clipworks.PreprocessConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = clipworks.save_pretrained(model, tmp_path / "ckpt", preprocess=pp)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    loaded = clipworks.create_model(f"local-dir:{out}")
    assert loaded.preprocess_config == pp and loaded.config == CFG and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # saving again over it replaces it whole and leaves no temporary directories behind
    clipworks.save_pretrained(loaded, out)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_text_is_trimmed_to_the_longest_sequence_with_identical_features():
    torch.manual_seed(0)
    model = CLIP(CFG).eval()
    tokens = clipworks.get_tokenizer("ViT-B-32")(["a cat", "a photo of a small dog", ""])
    seen = []
    model.text.transformer.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        trimmed = model.encode_text(tokens)
        full = model.encode_text_hidden(tokens).pooled  # runs all 77 positions
    longest = int((tokens == 49407).int().argmax(-1).max()) + 1
    assert seen == [longest, 77]
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-5)



def test_architecture_mismatch_suggests_the_preset_that_fits(tmp_path):
    from clipworks.checkpoints.open_clip import convert_to_open_clip

    cfg = clipworks.get_preset("ViT-B-32")
    with torch.device("meta"):
        shapes = CLIP(cfg).state_dict()
    # full-size shapes matter for the suggestion; zeros keep the file small to make (fp16, no data work)
    sd = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in shapes.items()}
    path = tmp_path / "b32.safetensors"
    save_file(convert_to_open_clip(sd, cfg), str(path))
    with pytest.raises(CheckpointError) as e:
        clipworks.create_model("ViT-B-16", pretrained=path)
    msg = str(e.value)
    assert "visual.patch_embed.weight" in msg and "(768, 3, 32, 32)" in msg  # the mismatching key and shape
    assert "ViT-B-32" in msg and "ViT-B-32-quickgelu" in msg
