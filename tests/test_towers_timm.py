"""The timm image towers (EVA-CLIP, PE-Core, ViTamin, MobileCLIP): parity with OpenCLIP's TimmModel at a reduced size,
OpenCLIP's layout both ways, MobileCLIP's reparameterisation, releases by name through a fake hub, and the errors."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import clipworks
from clipworks import TimmVisionConfig, presets, pretrained, reparameterize
from clipworks.checkpoints.open_clip import convert_from_open_clip, convert_to_open_clip
from clipworks.checkpoints.open_clip_dir import config_to_open_clip, load_open_clip_dir
from clipworks.checkpoints.export import formats_for
from clipworks.checkpoints.io import load_weights
from clipworks.factory import default_preprocess
from reference import open_clip_model, perturb_, tiny_config

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

# One preset per tower kind: EVA-02 (RoPE, SwiGLU), EVA-01 (its key bias is a computed buffer), PE-Core (RoPE,
# attention-pool head; bigG without a class token, 72 text positions), ViTamin (conv stem, linear head), MobileCLIP's
# FastViT (4 and 5 stages, BatchNorm, bidirectional text) and ViT (MCi stem, causal text), MobileCLIP 2's L/14.
FAMILIES = ["EVA02-B-16", "EVA01-g-14", "PE-Core-T-16-384", "PE-Core-bigG-14-448", "ViTamin-S", "MobileCLIP-S1",
            "MobileCLIP2-S3", "MobileCLIP-B", "MobileCLIP2-L-14"]  # fmt: skip
CAPTIONS = ["a photo of a cat", "", "A DOG on the grass, 3 birds!", "x " * 100]
TOL = 1e-5


def _inputs(cfg, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(rows, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    tokens = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS[:rows], context_length=cfg.text.context_length)
    return images, tokens


@torch.no_grad()
def _diffs(ref, model, cfg) -> dict[str, float]:
    images, tokens = _inputs(cfg)
    image = ref.encode_image(images, normalize=True) - model.encode_image(images, normalize=True)
    text = ref.encode_text(tokens, normalize=True) - model.encode_text(tokens, normalize=True)
    return {"image": image.abs().max().item(), "text": text.abs().max().item()}


def _reference(name: str):
    """clipworks' tiny config of preset `name` and OpenCLIP's model of it (TimmModel around timm's model of the same
    name, shrunk by the config's model_kwargs), every tensor perturbed."""
    cfg = tiny_config(clipworks.get_preset(name))
    torch.manual_seed(0)
    ref = open_clip_model(cfg).eval()
    perturb_(ref)
    return cfg, ref


@pytest.mark.parametrize("name", FAMILIES)
def test_outputs_match_open_clip(name, tmp_path, record_property):
    cfg, ref = _reference(name)
    sd = ref.state_dict()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))

    model = clipworks.create_model(cfg, pretrained=path)  # built on the meta device, then loaded
    assert not any(b.is_meta for b in model.buffers())  # RoPE tables, EVA's key bias: computed after the load
    diffs = _diffs(ref, model, cfg)
    record_property("max_abs_diff", diffs)
    assert max(diffs.values()) <= TOL, diffs

    back = convert_to_open_clip(model.state_dict(), cfg)  # export to OpenCLIP's layout: the very same tensors
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.fixture
def timm_named(monkeypatch):
    """OpenCLIP builds timm towers by name alone: register the tiny model of a config under a name of its own (timm's
    entry point of the real name, with the config's model_kwargs), for one test; the config with that name."""
    registry = timm.models._registry._model_entrypoints

    def register(cfg):
        v = cfg.vision
        name, create, sizes = f"cwtest_{v.model_name}", registry[v.model_name], dict(v.model_kwargs)
        monkeypatch.setitem(registry, name, lambda pretrained=False, **kw: create(pretrained, **{**kw, **sizes}))
        return replace(cfg, vision=replace(v, model_name=name, model_kwargs=()))

    return register


@pytest.mark.parametrize("name", ["EVA02-B-16", "PE-Core-T-16-384", "ViTamin-S", "MobileCLIP-S1", "MobileCLIP-B"])
def test_open_clip_loads_what_clipworks_writes(name, tmp_path, timm_named, record_property):
    cfg, ref = _reference(name)
    named = timm_named(cfg)
    model = clipworks.create_model(named)
    load_weights(model, convert_from_open_clip(ref.state_dict(), named))
    path = clipworks.save_pretrained(model, tmp_path / "oc", format="open_clip")
    written = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]
    assert written["custom_text"] and written["vision_cfg"]["timm_model_name"] == named.vision.model_name

    oc, _, transform = open_clip.create_model_and_transforms(f"local-dir:{path}")
    assert type(oc).__name__ == "CustomTextCLIP"
    diffs = _diffs(oc.eval(), model, named)
    record_property("max_abs_diff_open_clip", diffs)
    assert max(diffs.values()) <= TOL, diffs
    assert oc.visual.preprocess_cfg["size"] in (named.vision.image_size, (named.vision.image_size,) * 2)

    back_cfg, back_pp, back_sd = load_open_clip_dir(path)
    assert back_cfg == named and back_pp == default_preprocess(named)
    assert all(torch.equal(back_sd[k], v) for k, v in model.state_dict().items())


def test_model_kwargs_travel_in_clipworks_checkpoints_only(tmp_path):
    cfg = tiny_config(clipworks.get_preset("MobileCLIP2-S3"))
    d = json.loads(json.dumps(cfg.to_dict()))  # lists where the config has tuples
    assert clipworks.CLIPConfig.from_dict(d) == cfg and hash(cfg.vision)
    model = clipworks.create_model(cfg)
    perturb_(model)
    back = clipworks.create_model(f"local-dir:{clipworks.save_pretrained(model, tmp_path / 'cw')}")
    assert back.config == cfg
    images, _ = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(back.encode_image(images), model.encode_image(images))
    # OpenCLIP names timm models only: a tower sized by model_kwargs has no OpenCLIP layout
    with pytest.raises(ValueError, match="fastvit_mci3.*model_kwargs"):
        config_to_open_clip(cfg)
    assert formats_for(model) == ["clipworks"]


def test_config_checks():
    assert TimmVisionConfig("fastvit_mci0", model_kwargs={"layers": [1, 1]}).model_kwargs == (("layers", (1, 1)),)
    with pytest.raises(ValueError, match=r"unknown timm projection 'proj'.*None, 'linear', 'mlp', 'none'"):
        TimmVisionConfig("eva02_base_patch16_clip_224", projection="proj")
    with pytest.raises(ValueError, match=r"\['num_classes'\].*set by the config's own fields"):
        TimmVisionConfig("eva02_base_patch16_clip_224", model_kwargs=(("num_classes", 3),))
    with pytest.raises(ValueError, match="not a number, string"):
        TimmVisionConfig("eva02_base_patch16_clip_224", model_kwargs=(("act_layer", torch.nn.GELU),))
    with pytest.raises(ValueError, match="'abs_attn'.*not supported"):
        TimmVisionConfig("resnet50", pool="abs_attn")


def test_unknown_timm_model_is_named_in_one_line():
    cfg = tiny_config(clipworks.get_preset("EVA02-B-16"))
    cfg = replace(cfg, vision=replace(cfg.vision, model_name="eva02_bsae_patch16_clip_224"))
    with pytest.raises(ValueError, match="no model 'eva02_bsae_patch16_clip_224'; did you mean eva02_base") as e:
        clipworks.create_model(cfg)
    assert "\n" not in str(e.value)


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"pip install 'clipworks\[timm\]'"):
        clipworks.create_model(tiny_config(clipworks.get_preset("EVA02-B-16")))


@pytest.mark.parametrize("name", ["MobileCLIP-S1", "MobileCLIP2-S3"])
def test_reparameterize_keeps_the_features(name, tmp_path, record_property):
    cfg, ref = _reference(name)
    model = clipworks.create_model(cfg)
    load_weights(model, convert_from_open_clip(ref.state_dict(), cfg))
    images, _ = _inputs(cfg, rows=4)
    with torch.no_grad():
        before = model.encode_image(images, normalize=True)
        params = sum(p.numel() for p in model.parameters())
        assert reparameterize(model) is model
        after = model.encode_image(images, normalize=True)
    diff = (after - before).abs().max().item()
    record_property("max_abs_diff_reparameterized", diff)
    assert diff <= TOL and sum(p.numel() for p in model.parameters()) < params
    assert not model.training and model.visual.reparameterized
    with pytest.raises(ValueError, match="fused for inference.*save the model before"):
        clipworks.save_pretrained(model, tmp_path / "fused")
    assert not (tmp_path / "fused").exists()
    reparameterize(model)  # a second call has nothing left to fuse
    assert model.visual.reparameterized


def test_commands_that_only_encode_fuse_the_tower():
    from argparse import Namespace

    from clipworks.search.commands import prepare_for_inference

    cfg, ref = _reference("MobileCLIP-S1")
    model = clipworks.create_model(cfg)
    load_weights(model, convert_from_open_clip(ref.state_dict(), cfg))
    images, _ = _inputs(cfg)
    with torch.no_grad():
        before = model.encode_image(images, normalize=True)
        prepare_for_inference(Namespace(), model)  # what embed, serve, classify and eval do with a loaded model
        after = model.encode_image(images, normalize=True)
    assert model.visual.reparameterized and (after - before).abs().max() <= TOL


def test_reparameterize_leaves_other_towers_alone():
    model = clipworks.create_model(tiny_config(clipworks.get_preset("EVA02-B-16")))
    keys = set(model.state_dict())
    assert reparameterize(model) is model and set(model.state_dict()) == keys and not model.visual.reparameterized


# Releases by name through a fake hub ----------------------------------------------------------------------------


def _photo(path):
    g = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (60, 90, 3), generator=g, dtype=torch.uint8).numpy()).save(path)
    return path


@pytest.mark.parametrize(
    "name, tag, weights",
    [("ViTamin-S", "datacomp1b", "pytorch_model.bin"),  # the repository's own file name, pickled
     ("MobileCLIP2-S0", "dfndr2b", "open_clip_model.safetensors"),  # [0, 1] pixels, bilinear
     ("PE-Core-T-16-384", "meta", "open_clip_model.safetensors")],  # 32 text positions, squashed to [-1, 1]
)  # fmt: skip
def test_release_by_name_and_tag(name, tag, weights, tmp_path, monkeypatch):
    from fakehub import serving

    cfg, ref = _reference(name)
    file = tmp_path / weights
    if weights.endswith(".bin"):
        torch.save(ref.state_dict(), file)
    else:
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(file))
    monkeypatch.setitem(presets.PRESETS, name, cfg)
    entry = pretrained.get_pretrained(name, tag)
    theirs = open_clip.pretrained.get_pretrained_cfg(name, tag)
    assert theirs["hf_hub"].rstrip("/") in (entry.hf_hub, f"{entry.hf_hub}/{entry.filename}")
    entry = replace(entry, preprocess=replace(entry.preprocess, image_size=cfg.vision.image_size))
    monkeypatch.setitem(pretrained._ENTRIES, (name, tag), entry)
    with serving(monkeypatch, tmp_path / "home") as hub:
        hub.add_repo(entry.hf_hub, {weights: file.read_bytes()})
        model, _, preprocess = clipworks.create_model_and_transforms(f"{name}:{tag}")
        assert hub.gets(entry.hf_hub, weights)
    tokens = clipworks.get_tokenizer(model)(CAPTIONS)
    assert torch.equal(tokens, open_clip.get_tokenizer(name)(CAPTIONS))  # CLIP's BPE at the config's context
    pp = entry.preprocess
    transform = open_clip.transform.image_transform(pp.image_size, is_train=False, mean=theirs["mean"],
                                                    std=theirs["std"], resize_mode=theirs["resize_mode"],
                                                    interpolation=theirs["interpolation"])  # fmt: skip
    image = Image.open(_photo(tmp_path / "photo.png")).convert("RGB")
    assert torch.equal(preprocess(image), transform(image))
    with torch.no_grad():
        ours = model(preprocess(image)[None], tokens)
        img, txt = ref.encode_image(transform(image)[None], normalize=True), ref.encode_text(tokens, normalize=True)
    assert (ours.image_features - img).abs().max() <= TOL and (ours.text_features - txt).abs().max() <= TOL
