"""create_model end to end through a fake Hugging Face hub on loopback: registry tags and hf-hub: repos."""

from dataclasses import replace

import pytest
import torch

import clipworks
from clipworks import presets, pretrained
from clipworks.models.clip import CLIP
from fakehub import serving
from reference import perturb_, tiny_config

pytest.importorskip("huggingface_hub")


def _model(name: str) -> CLIP:
    torch.manual_seed(0)
    model = CLIP(tiny_config(clipworks.get_preset(name))).eval()
    perturb_(model)
    return model


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _same_outputs(a: CLIP, b: CLIP) -> None:
    cfg = a.config
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = clipworks.get_tokenizer("ViT-B-32")(["a red circle", "two dogs"])
    with torch.no_grad():
        assert (a.encode_image(images, normalize=True) - b.encode_image(images, normalize=True)).abs().max() <= 1e-5
        assert (a.encode_text(tokens, normalize=True) - b.encode_text(tokens, normalize=True)).abs().max() <= 1e-5


@pytest.mark.parametrize("layout", ["open_clip", "transformers"])
def test_hf_hub_repo_loads_with_its_architecture_and_preprocessing(layout, tmp_path, monkeypatch):
    model = _model("ViT-B-32-quickgelu")
    pp = clipworks.PreprocessConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    exported = clipworks.save_pretrained(model, tmp_path / "export", preprocess=pp, format=layout)
    with serving(monkeypatch, tmp_path / "home") as hub:
        hub.add_repo("org/tiny-clip", _files(exported))
        loaded = clipworks.create_model("hf-hub:org/tiny-clip")
    assert loaded.preprocess_config == pp and not loaded.training
    assert loaded.config.text.act == "quick_gelu"
    _same_outputs(model, loaded)


def test_registry_tag_downloads_builds_the_quickgelu_variant_and_carries_preprocessing(tmp_path, monkeypatch):
    model = _model("ViT-B-32-quickgelu")
    # the registry's OpenAI ViT-B-32 entry, pointed at the fake hub, and a tiny architecture under its preset name
    monkeypatch.setitem(presets.PRESETS, "ViT-B-32-quickgelu", model.config)
    entry = replace(pretrained.get_pretrained("ViT-B-32", "openai"), hf_hub="org/openai-tiny")
    monkeypatch.setitem(pretrained._ENTRIES, ("ViT-B-32", "openai"), entry)
    exported = clipworks.save_pretrained(model, tmp_path / "export", format="open_clip")
    with serving(monkeypatch, tmp_path / "home") as hub:
        hub.add_repo("org/openai-tiny", _files(exported))
        loaded, _, preprocess = clipworks.create_model_and_transforms("ViT-B-32", pretrained="openai")
        again = clipworks.create_model("ViT-B-32:openai")  # the CLI's NAME:TAG spelling, served from the cache
        assert len(hub.gets("org/openai-tiny", "open_clip_model.safetensors")) == 1
    assert loaded.config == model.config  # QuickGELU, as OpenAI's weights need
    assert loaded.preprocess_config == entry.preprocess == preprocess.cfg
    _same_outputs(model, loaded)
    _same_outputs(model, again)


def test_get_tokenizer_accepts_model_config_and_tagged_names():
    model = clipworks.create_model(clipworks.get_preset("ViT-B-32"))
    for source in (model, model.config, "ViT-B-32:openai", "ViT-B-32"):
        assert clipworks.get_tokenizer(source)(["a cat"]).shape == (1, 77)
