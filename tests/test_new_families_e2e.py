"""A new user's first calls for the SigLIP 2, multilingual and CLIPA families, through a fake hub: `NAME:TAG` gives the
release's weights, preprocessing and tokenizer (from the release's repository, or another one the config names),
and the features equal OpenCLIP's for the same weights, image file and caption."""

from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import clipworks
from clipworks import hf_tokenizer, presets, pretrained
from fakehub import serving
from reference import open_clip_hf_model, open_clip_model, perturb_, tiny_config
from tokenizer_files import build_bert, build_gemma, build_xlm_roberta

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("tokenizers")
pytest.importorskip("huggingface_hub")

CAPTIONS = ["A photo of a cat.", "zwei Hunde im Schnee", "", "un chat noir & blanc, 3 souris!", "x " * 200]


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _register_tiny(monkeypatch, name: str, tag: str, repo: str, cfg) -> pretrained.PretrainedEntry:
    """The registry entry for (name, tag), pointed at a tiny architecture under the preset's name."""
    monkeypatch.setitem(presets.PRESETS, name, cfg)
    entry = pretrained.get_pretrained(name, tag)
    entry = replace(entry, hf_hub=repo, preprocess=replace(entry.preprocess, image_size=cfg.vision.image_size))
    monkeypatch.setitem(pretrained._ENTRIES, (name, tag), entry)
    monkeypatch.setattr(hf_tokenizer, "_HUB_DIRS", {})  # tokenizer repositories resolved afresh for the fake hub
    return entry


def _open_clip_transform(entry):
    pp = entry.preprocess
    return open_clip.transform.image_transform(pp.image_size, is_train=False, mean=pp.mean, std=pp.std,
                                               resize_mode=pp.resize_mode, interpolation=pp.interpolation)  # fmt: skip


def _check_against_open_clip(model, preprocess, ref, ref_tokenizer, entry, image_path) -> None:
    tokens = clipworks.get_tokenizer(model)(CAPTIONS)
    assert torch.equal(tokens, ref_tokenizer(CAPTIONS))
    image = Image.open(image_path).convert("RGB")
    assert torch.equal(preprocess(image), _open_clip_transform(entry)(image))
    with torch.no_grad():
        ours = model(preprocess.load(image_path)[None], tokens)
        theirs_img = ref.encode_image(_open_clip_transform(entry)(image)[None], normalize=True)
        theirs_txt = ref.encode_text(tokens, normalize=True)
    assert (ours.image_features - theirs_img).abs().max() <= 1e-5
    assert (ours.text_features - theirs_txt).abs().max() <= 1e-5


@pytest.fixture
def photo(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "photo.png"
    Image.fromarray(torch.randint(0, 256, (60, 90, 3), generator=g, dtype=torch.uint8).numpy()).save(path)
    return path


def _saved_reference(cfg, path):
    """OpenCLIP's model of `cfg`, every tensor perturbed, its state dict saved as safetensors at `path`."""
    torch.manual_seed(0)
    ref = open_clip_model(cfg).eval()
    perturb_(ref)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref


def test_siglip2_release_by_name_and_tag(tmp_path, monkeypatch, photo):
    name, tag, repo = "ViT-B-16-SigLIP2-256", "webli", "timm/ViT-B-16-SigLIP2-256"
    cfg = tiny_config(clipworks.get_preset(name))
    ref = _saved_reference(cfg, tmp_path / "open_clip_model.safetensors")
    tokenizer_dir = build_gemma(tmp_path / "gemma")
    entry = _register_tiny(monkeypatch, name, tag, repo, cfg)
    with serving(monkeypatch, tmp_path / "home") as hub:
        # timm's SigLIP repositories hold the weights and the tokenizer files side by side
        hub.add_repo(repo, {**_files(tokenizer_dir), "open_clip_model.safetensors":
                            (tmp_path / "open_clip_model.safetensors").read_bytes()})  # fmt: skip
        model, _, preprocess = clipworks.create_model_and_transforms(f"{name}:{tag}")
        assert model.tokenizer_config.source == repo and model.tokenizer_config.clean == "canonicalize"
        assert (preprocess.cfg.resize_mode, preprocess.cfg.mean) == ("squash", (0.5, 0.5, 0.5))
        ref_tokenizer = open_clip.tokenizer.HFTokenizer(str(tokenizer_dir), context_length=64, clean="canonicalize")
        _check_against_open_clip(model, preprocess, ref, ref_tokenizer, entry, photo)


def test_multilingual_release_takes_its_tokenizer_from_the_named_repository(tmp_path, monkeypatch, photo):
    name, tag = "xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k"
    repo = "laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k"
    cfg = tiny_config(clipworks.get_preset(name))
    torch.manual_seed(0)
    ref = open_clip_hf_model(cfg, "xlm-roberta").eval()
    perturb_(ref)
    torch.save(ref.state_dict(), tmp_path / "open_clip_pytorch_model.bin")  # LAION's older repos hold pickles only
    tokenizer_dir = build_xlm_roberta(tmp_path / "xlmr")
    entry = _register_tiny(monkeypatch, name, tag, repo, cfg)
    with serving(monkeypatch, tmp_path / "home") as hub:
        hub.add_repo(repo, {"open_clip_pytorch_model.bin": (tmp_path / "open_clip_pytorch_model.bin").read_bytes()})
        hub.add_repo("xlm-roberta-base", _files(tokenizer_dir))
        model, _, preprocess = clipworks.create_model_and_transforms(name, pretrained=tag)
        assert model.tokenizer_config.source == "xlm-roberta-base"
        ref_tokenizer = open_clip.tokenizer.HFTokenizer(str(tokenizer_dir), context_length=77)
        _check_against_open_clip(model, preprocess, ref, ref_tokenizer, entry, photo)
        assert hub.gets("xlm-roberta-base", "tokenizer.json") and not hub.gets(repo, "open_clip_model.safetensors")


def test_clipa_release_strips_berts_separator(tmp_path, monkeypatch, photo):
    name, tag, repo = "ViT-L-14-CLIPA", "datacomp1b", "UCSC-VLAA/ViT-L-14-CLIPA-datacomp1B"
    cfg = tiny_config(clipworks.get_preset(name))
    ref = _saved_reference(cfg, tmp_path / "open_clip_model.safetensors")
    tokenizer_dir = build_bert(tmp_path / "bert")
    entry = _register_tiny(monkeypatch, name, tag, repo, cfg)
    with serving(monkeypatch, tmp_path / "home") as hub:
        hub.add_repo(repo, {"open_clip_model.safetensors": (tmp_path / "open_clip_model.safetensors").read_bytes()})
        hub.add_repo("bert-base-uncased", _files(tokenizer_dir))
        model, _, preprocess = clipworks.create_model_and_transforms(f"{name}:{tag}")
        assert model.tokenizer_config.strip_sep_token and model.tokenizer_config.context_length == 32
        assert (preprocess.cfg.interpolation, preprocess.cfg.mean) == ("bilinear", (0.485, 0.456, 0.406))
        ref_tokenizer = open_clip.tokenizer.HFTokenizer(str(tokenizer_dir), context_length=32, strip_sep_token=True)
        _check_against_open_clip(model, preprocess, ref, ref_tokenizer, entry, photo)
