"""Export to every checkpoint layout: OpenCLIP's and transformers' own loaders read what clipworks writes with the
same outputs, round trips in every direction keep them, a failed export never replaces a good one, and
`clipworks convert` writes each layout."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import open_clip_model, perturb_, tiny_config

import clipworks
from clipworks import CLIP, PreprocessConfig, cli, get_preset
from clipworks.presets import get_preset_tokenizer
from clipworks.checkpoints import open_clip_dir
from clipworks.checkpoints.export import FORMATS, formats_for, preprocess_to_transformers, save_pretrained
from clipworks.checkpoints.io import CheckpointError, load_weights
from clipworks.checkpoints.open_clip import convert_from_open_clip, convert_to_open_clip
from clipworks.checkpoints.open_clip_dir import (
    config_from_open_clip,
    config_to_open_clip,
    is_open_clip_dir,
    load_open_clip_dir,
    tokenizer_from_open_clip,
)
from clipworks.checkpoints.transformers import preprocess_from_transformers
from clipworks.config import OPENAI_MEAN, OPENAI_STD
from clipworks.factory import create_model, default_preprocess
from clipworks.tokenizer import default_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # loading a sub-model reports the other tower's keys as unexpected

FAMILIES = ["ViT-B-32", "ViT-B-32-quickgelu", "RN50", "convnext_base_w", "ViT-B-16-SigLIP"]
VIT_FAMILIES = ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-g-14"]
CAPTIONS = ["a photo of a cat", "", "A DOG on the grass, 3 birds!", "two dogs playing in the snow at night"]
TOL = 1e-5


def tiny_model(name: str, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(tiny_config(get_preset(name))).eval()
    perturb_(model, seed=seed)
    return model


def inputs(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens): CLIP's tokens padded with 0 as OpenCLIP pads them; random ids for SigLIP's vocabulary."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    if cfg.text.vocab_size == 49408:
        return images, default_tokenizer()(CAPTIONS, context_length=cfg.text.context_length)
    return images, torch.randint(0, cfg.text.vocab_size, (len(CAPTIONS), cfg.text.context_length), generator=g)


@torch.no_grad()
def max_diffs(ref, model, cfg) -> dict[str, float]:
    """Largest differences of normalised image/text embeddings and of logits (relative to the logit scale), between
    any two models with OpenCLIP's `encode_image`/`encode_text`/`logit_scale`/`logit_bias`."""
    images, tokens = inputs(cfg)
    out = {}
    for name, m in (("ref", ref), ("model", model)):
        img, txt = m.encode_image(images, normalize=True), m.encode_text(tokens, normalize=True)
        bias = m.logit_bias if getattr(m, "logit_bias", None) is not None else 0.0
        out[name] = (img, txt, m.logit_scale.exp() * img @ txt.t() + bias)
    (ri, rt, rl), (mi, mt, ml) = out["ref"], out["model"]
    scale = ref.logit_scale.exp().item()
    return {"image": (ri - mi).abs().max().item(), "text": (rt - mt).abs().max().item(),
            "logits": (rl - ml).abs().max().item() / scale}  # fmt: skip


def assert_same_outputs(ref, model, cfg, record=None, label: str = "") -> None:
    diffs = max_diffs(ref, model, cfg)
    if record is not None:
        record(f"max_abs_diff{label}", diffs)
    assert max(diffs.values()) <= TOL, diffs


def load_open_clip_back(path: Path) -> CLIP:
    """clipworks' model from an OpenCLIP directory (what `create_model("local-dir:...")` does once wired)."""
    cfg, preprocess, sd = load_open_clip_dir(path)
    model = CLIP(cfg)
    load_weights(model, sd, source=str(path))
    model.preprocess_config = preprocess
    return model.eval()


@pytest.fixture
def timm_sized(monkeypatch):
    """OpenCLIP builds ConvNeXt and SigLIP towers through timm by name only, and no timm model is test-sized: register
    a tiny timm model of the same family under a new name, and that name in clipworks' tables, for one test."""
    registry = timm.models._registry._model_entrypoints

    def register(cfg) -> None:
        v = cfg.vision
        if v.kind == "convnext":
            name, base = "convnext_cwtest", "convnext_base"
            monkeypatch.setitem(open_clip_dir.TIMM_CONVNEXT, name, (v.depths, v.dims, v.norm_eps))
            sizes = {"depths": v.depths, "dims": v.dims}
        elif v.kind == "vit" and v.pool == "map":
            name, base = f"vit_cwtest_patch{v.patch_size}_siglip_{v.image_size}", "vit_base_patch16_siglip_224"
            entry = (v.width, v.layers, v.heads, v.mlp_ratio, v.patch_size, v.image_size, v.act)
            monkeypatch.setitem(open_clip_dir.TIMM_SIGLIP, name, entry)
            sizes = {"patch_size": v.patch_size, "embed_dim": v.width, "depth": v.layers, "num_heads": v.heads,
                     "img_size": v.image_size, "act_layer": v.act}  # fmt: skip
        else:
            return
        create = registry[base]
        monkeypatch.setitem(registry, name, lambda pretrained=False, **kw: create(pretrained, **{**kw, **sizes}))

    return register


def open_clip_preprocess_of(oc_model, transform) -> dict:
    normalize = next(t for t in transform.transforms if type(t).__name__ == "Normalize")
    pp = oc_model.visual.preprocess_cfg
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    return {"image_size": size, "mean": tuple(normalize.mean), "std": tuple(normalize.std),
            "interpolation": pp["interpolation"], "resize_mode": pp["resize_mode"]}  # fmt: skip


# OpenCLIP's layout ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_open_clip_layout_loads_in_open_clip(name, tmp_path, timm_sized, record_property):
    model = tiny_model(name)
    cfg = model.config
    timm_sized(cfg)
    path = save_pretrained(model, tmp_path / "oc", format="open_clip")
    assert sorted(p.name for p in path.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert is_open_clip_dir(path)

    oc, _, transform = open_clip.create_model_and_transforms(f"local-dir:{path}")
    assert_same_outputs(oc.eval(), model, cfg, record_property, "_open_clip")
    ours = default_preprocess(cfg)
    expected = {k: v for k, v in asdict(ours).items() if k != "fill_color"}
    assert open_clip_preprocess_of(oc, transform) == expected

    back = load_open_clip_back(path)
    assert back.config == cfg
    assert back.preprocess_config == ours
    assert_same_outputs(model, back, cfg, record_property, "_back")


@pytest.mark.parametrize("name", FAMILIES)
def test_open_clip_state_dict_round_trips_through_clipworks(name, tmp_path, timm_sized):
    """OpenCLIP model -> clipworks -> OpenCLIP directory -> OpenCLIP: the very same tensors and outputs."""
    cfg = tiny_config(get_preset(name))
    timm_sized(cfg)
    torch.manual_seed(0)
    ref = open_clip_model(cfg).eval()
    perturb_(ref)
    model = CLIP(cfg).eval()
    load_weights(model, convert_from_open_clip(ref.state_dict(), cfg))
    path = save_pretrained(model, tmp_path / "oc", format="open_clip")
    oc = open_clip.create_model(f"local-dir:{path}").eval()
    expected, got = ref.state_dict(), oc.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert_same_outputs(ref, oc, cfg)


def test_reads_the_directory_open_clip_writes(tmp_path):
    """A directory written by OpenCLIP's own hub exporter (`save_for_hf`: safetensors and pickle, its config)."""
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.push_to_hf_hub import save_for_hf

    model_cfg = {"embed_dim": 24, "quick_gelu": True,
                 "vision_cfg": {"image_size": 48, "layers": 2, "width": 48, "head_width": 16, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}  # fmt: skip
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(**model_cfg).eval()
    perturb_(ref)
    pp = {"size": 48, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear",
          "resize_mode": "squash"}  # fmt: skip
    set_model_preprocess_cfg(ref, pp)
    no_tokenizer = type("NoTokenizer", (), {"save_pretrained": lambda self, path: None})()
    save_for_hf(ref, no_tokenizer, model_cfg, tmp_path, safe_serialization="both")
    assert {"open_clip_model.safetensors", "open_clip_pytorch_model.bin"} <= {p.name for p in tmp_path.iterdir()}

    model = load_open_clip_back(tmp_path)
    v = model.config.vision
    assert (v.image_size, v.patch_size, v.width, v.heads, v.act, model.config.text.act) == (
        48, 16, 48, 3, "quick_gelu", "quick_gelu"
    )  # fmt: skip
    assert model.preprocess_config == PreprocessConfig(48, (0.5,) * 3, (0.25,) * 3, "bilinear", "squash")
    assert_same_outputs(ref, model, model.config)


def test_open_clip_dir_reading(tmp_path):
    model = tiny_model("ViT-B-32")
    path = save_pretrained(model, tmp_path / "oc", format="open_clip")
    other = tiny_model("ViT-B-32", seed=1)
    theirs = convert_to_open_clip(other.state_dict(), model.config)
    # Both present: the safetensors file wins; alone, the pickle is read with torch.load(weights_only=True).
    torch.save(theirs, path / "open_clip_pytorch_model.bin")
    _, _, sd = load_open_clip_dir(path)
    assert torch.equal(sd["text.proj.weight"], model.state_dict()["text.proj.weight"])
    (path / "open_clip_model.safetensors").unlink()
    _, _, sd = load_open_clip_dir(path)
    assert torch.equal(sd["text.proj.weight"], other.state_dict()["text.proj.weight"])
    torch.save({"weights": theirs, "hook": print}, path / "open_clip_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_open_clip_dir(path)
    (path / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_open_clip_dir(path)
    assert not is_open_clip_dir(tmp_path) and not is_open_clip_dir(save_pretrained(model, tmp_path / "cw"))


def _without_defaults(model_cfg: dict) -> dict:
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    top = {"quick_gelu": False, "custom_text": False, "init_logit_bias": None, "init_logit_scale": math.log(1 / 0.07)}

    def strip(d: dict, defaults: dict) -> dict:
        return {k: v for k, v in d.items() if not (k in defaults and defaults[k] == v)}

    out = strip(model_cfg, top)
    out["vision_cfg"] = strip(model_cfg["vision_cfg"], asdict(CLIPVisionCfg()))
    out["text_cfg"] = strip(model_cfg["text_cfg"], asdict(CLIPTextCfg()))
    if "multimodal_cfg" in model_cfg:  # CoCa: the keys its decoder is built from; MultimodalCfg's others (its
        # attn_pooler_heads, n_queries, mlp_ratio, ... and vocab_size, which text_cfg's sets) are never read
        from open_clip.coca_model import MultimodalCfg

        read = {k: v for k, v in model_cfg["multimodal_cfg"].items() if k in _MULTIMODAL_READ}
        out["multimodal_cfg"] = strip(read, asdict(MultimodalCfg()))
    return out


_MULTIMODAL_READ = ("context_length", "width", "heads", "layers", "ls_init_value")


def _open_clip_json(name: str) -> dict:
    return json.loads((Path(open_clip.__file__).parent / "model_configs" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", clipworks.list_models())
def test_config_to_open_clip_equals_open_clips_own_json(name):
    theirs = _open_clip_json(name)
    ours = config_to_open_clip(get_preset(name), get_preset_tokenizer(name))  # the tokenizer: text_cfg's hf_* keys
    if name == "ViT-B-16-SigLIP":  # OpenCLIP's SigLIP configs leave out the ln(10) start its trainer passes
        assert ours.get("init_logit_scale") is None
    assert _without_defaults(ours) == _without_defaults(theirs)
    assert config_from_open_clip(theirs) == get_preset(name)


def test_every_open_clip_config_is_read_or_refused_clearly():
    """Each of OpenCLIP's model configs is either read and written back the same (its tokenizer too), or refused with
    a CheckpointError."""
    read, refused = [], []
    for path in sorted((Path(open_clip.__file__).parent / "model_configs").glob("*.json")):
        theirs = json.loads(path.read_text())
        try:
            cfg, tokenizer = config_from_open_clip(theirs), tokenizer_from_open_clip(theirs)
        except CheckpointError:
            refused.append(path.stem)
            continue
        if cfg.vision.kind == "timm":  # OpenCLIP's older timm-tower configs (swin, ...) keep the text tower at the
            theirs.setdefault("custom_text", True)  # top level: the same model; clipworks writes its newer layout
        ours, theirs = _without_defaults(config_to_open_clip(cfg, tokenizer)), _without_defaults(theirs)
        assert ours == theirs, path.stem
        read.append(path.stem)
    hf_text = {"roberta-ViT-B-32", "xlm-roberta-base-ViT-B-32", "xlm-roberta-large-ViT-H-14", "mt5-base-ViT-B-32",
               "mt5-xl-ViT-H-14", "nllb-clip-base", "nllb-clip-large", "nllb-clip-base-siglip",
               "nllb-clip-large-siglip"}  # fmt: skip
    read_too = {"ViT-SO400M-14-SigLIP", "convnext_xxlarge", "convnext_large_d", "ViT-L-16-SigLIP-256"}
    coca = {"coca_ViT-B-32", "coca_ViT-L-14", "coca_base"}
    assert len(read) >= 80 and hf_text | read_too | coca <= set(read)
    assert "coca_roberta-ViT-B-32" in refused  # CoCa over a Hugging Face text tower
    timm_towers = {"EVA02-B-16", "PE-Core-bigG-14-448", "ViTamin-XL-384", "MobileCLIP2-S4", "swin_base_patch4_window7_224"}
    assert timm_towers <= set(read)


def test_timm_tables_match_timm():
    with torch.device("meta"):
        for name, (depths, dims, eps) in open_clip_dir.TIMM_CONVNEXT.items():
            m = timm.create_model(name)
            block = m.stages[0].blocks[0]
            assert isinstance(block.mlp.fc1, torch.nn.Linear) and block.norm.eps == eps, name
            assert tuple(len(s.blocks) for s in m.stages) == depths, name
            assert tuple(s.blocks[0].conv_dw.out_channels for s in m.stages) == dims, name
        for name, (width, layers, heads, mlp_ratio, patch, image, act) in open_clip_dir.TIMM_SIGLIP.items():
            m = timm.create_model(name)
            act_layer = m.blocks[0].mlp.act
            tanh = type(act_layer).__name__ == "GELUTanh" or getattr(act_layer, "approximate", "none") == "tanh"
            got = (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads, m.blocks[0].mlp.fc1.out_features,
                   m.patch_embed.patch_size, m.patch_embed.img_size, m.cls_token, m.global_pool, tanh)  # fmt: skip
            tanh_wanted = act == "gelu_tanh"
            assert got == (width, layers, heads, int(width * mlp_ratio), (patch,) * 2, (image,) * 2, None, "map",
                           tanh_wanted), name  # fmt: skip


# transformers' layout ------------------------------------------------------------------------------------------


def hf_features(out) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding; 4.x a tensor.
    return out.pooler_output if hasattr(out, "pooler_output") else out


class HFAsOpenCLIP(torch.nn.Module):
    """A transformers CLIPModel behind OpenCLIP's encode_image/encode_text names, for `max_diffs`."""

    def __init__(self, hf):
        super().__init__()
        self.hf, self.logit_scale, self.logit_bias = hf, hf.logit_scale, None

    def encode_image(self, images, normalize=False):
        return F.normalize(hf_features(self.hf.get_image_features(pixel_values=images)), dim=-1)

    def encode_text(self, tokens, normalize=False):
        return F.normalize(hf_features(self.hf.get_text_features(input_ids=tokens)), dim=-1)


@pytest.mark.parametrize("name", VIT_FAMILIES)
@torch.no_grad()
def test_transformers_layout_loads_in_transformers(name, tmp_path, record_property):
    model = tiny_model(name)
    cfg = model.config
    path = save_pretrained(model, tmp_path / "hf", format="transformers")
    hf = transformers.CLIPModel.from_pretrained(path).eval()
    assert_same_outputs(HFAsOpenCLIP(hf), model, cfg, record_property, "_transformers")
    images, tokens = inputs(cfg)
    logits = hf(input_ids=tokens, pixel_values=images).logits_per_image
    assert (logits - model(images, tokens).logits()[0]).abs().max() <= TOL * hf.logit_scale.exp()

    # What diffusion pipelines load: the text encoder alone, its hidden states ("CLIP skip") and projection.
    text = transformers.CLIPTextModel.from_pretrained(path).eval()(input_ids=tokens, output_hidden_states=True)
    ours = model.encode_text_hidden(tokens)
    assert len(text.hidden_states) == len(ours.hidden_states) == cfg.text.layers + 1
    hidden = max((a - b).abs().max().item() for a, b in zip(text.hidden_states, ours.hidden_states))
    last = (text.last_hidden_state - ours.last_hidden).abs().max().item()
    embeds = transformers.CLIPTextModelWithProjection.from_pretrained(path).eval()(input_ids=tokens).text_embeds
    projected = (embeds - model.encode_text(tokens)).abs().max().item()
    vision = transformers.CLIPVisionModelWithProjection.from_pretrained(path).eval()(pixel_values=images)
    image_embeds = (vision.image_embeds - model.encode_image(images)).abs().max().item()
    record_property("max_abs_diff_text_models", {"hidden": hidden, "last": last, "text_embeds": projected})
    assert max(hidden, last, projected, image_embeds) <= TOL

    back = create_model(f"local-dir:{path}")
    assert back.preprocess_config == default_preprocess(cfg)
    if name != "ViT-g-14":  # a tiny ViT-g's 4.3637 MLP ratio reads back as another ratio giving the same size
        assert back.config == cfg
    assert_same_outputs(model, back, cfg, record_property, "_back")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_pretrained(tiny_model("ViT-B-32"), tmp_path_factory.mktemp("hf") / "hf", format="transformers")


def test_transformers_tokenizer_gives_clipworks_ids(hf_dir):
    hf_tok = transformers.CLIPTokenizer.from_pretrained(hf_dir)
    assert isinstance(transformers.AutoTokenizer.from_pretrained(hf_dir), transformers.CLIPTokenizer)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (49406, 49407, 49407)
    assert hf_tok.model_max_length == 77
    captions = [*CAPTIONS, "don't stop: it's 10 o'clock", "Wow!!! (really?) #1"]
    ours = default_tokenizer().tokenize(captions)
    theirs = hf_tok(captions)["input_ids"]
    assert theirs == [ids[:n] for ids, n in zip(ours.ids.tolist(), ours.lengths.tolist())]
    # transformers pads with the end token, clipworks and OpenCLIP with 0: causal CLIP text features are the same.
    padded = hf_tok(captions, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    assert torch.equal(padded[ours.attention_mask], ours.ids[ours.attention_mask])
    assert (padded[~ours.attention_mask] == 49407).all() and (ours.ids[~ours.attention_mask] == 0).all()
    hf = transformers.CLIPModel.from_pretrained(hf_dir).eval()
    model = create_model(f"local-dir:{hf_dir}")
    with torch.no_grad():
        diff = hf_features(hf.get_text_features(input_ids=padded)) - model.encode_text(ours.ids)
    assert diff.abs().max() <= TOL


def test_transformers_image_processor_config(hf_dir, tmp_path):
    ip = transformers.CLIPImageProcessor.from_pretrained(hf_dir)
    assert (ip.size["shortest_edge"], ip.crop_size["height"], ip.crop_size["width"]) == (32, 32, 32)
    assert (tuple(ip.image_mean), tuple(ip.image_std), int(ip.resample)) == (OPENAI_MEAN, OPENAI_STD, 3)
    assert ip.do_center_crop and ip.do_rescale and ip.do_normalize and ip.rescale_factor == pytest.approx(1 / 255)
    assert isinstance(transformers.CLIPProcessor.from_pretrained(hf_dir), transformers.CLIPProcessor)

    squash = PreprocessConfig(image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear",
                              resize_mode="squash")  # fmt: skip
    path = save_pretrained(tiny_model("ViT-B-32"), tmp_path / "squash", squash, format="transformers")
    ip = transformers.CLIPImageProcessor.from_pretrained(path)
    assert (ip.size["height"], ip.size["width"], ip.do_center_crop, int(ip.resample)) == (32, 32, False, 2)
    assert create_model(f"local-dir:{path}").preprocess_config == squash
    for pp in (PreprocessConfig(), squash, replace(squash, resize_mode="shortest", interpolation="nearest")):
        assert preprocess_from_transformers(preprocess_to_transformers(pp)) == pp
    with pytest.raises(ValueError, match="resize_mode='longest'.*'shortest'.*'squash'"):
        preprocess_to_transformers(replace(squash, resize_mode="longest"))


# Errors and atomic writes --------------------------------------------------------------------------------------


def test_formats_that_cannot_hold_a_model_say_which_can(tmp_path):
    with torch.device("meta"):  # full size, so that OpenCLIP's timm towers can hold them; the checks read no tensor
        resnet, siglip = CLIP(get_preset("RN50")), CLIP(get_preset("ViT-B-16-SigLIP"))
    with pytest.raises(ValueError, match="can be saved as clipworks or open_clip$"):
        save_pretrained(resnet, tmp_path / "RN50", format="transformers")
    assert formats_for(siglip) == list(FORMATS)  # transformers' SiglipModel holds it
    convnext = tiny_model("convnext_base_w")  # sized like no timm ConvNeXt, so OpenCLIP could not build it
    assert formats_for(convnext) == ["clipworks"]
    with pytest.raises(ValueError, match="no timm ConvNeXt.*convnext_base.*can be saved as clipworks$"):
        save_pretrained(convnext, tmp_path / "c", format="open_clip")
    with pytest.raises(ValueError, match=r"unknown checkpoint format 'onnx'; expected one of \['clipworks', 'open_"):
        save_pretrained(convnext, tmp_path / "c", format="onnx")
    assert not any(tmp_path.iterdir())  # nothing was written
    assert formats_for(tiny_model("ViT-B-32")) == list(FORMATS) == list(cli.CHECKPOINT_FORMATS)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_export_leaves_the_old_checkpoint(fmt, tmp_path, monkeypatch):
    import safetensors.torch

    path = save_pretrained(tiny_model("ViT-B-32", seed=0), tmp_path / "ckpt", format=fmt)
    before = _snapshot(path)
    write = safetensors.torch.save_file

    def write_then_fail(*args, **kwargs):
        write(*args, **kwargs)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", write_then_fail)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(tiny_model("ViT-B-32", seed=1), path, format=fmt)
    assert _snapshot(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary or half-written directory left
    monkeypatch.undo()
    save_pretrained(tiny_model("ViT-B-32", seed=1), path, format=fmt)
    assert _snapshot(path).keys() == before.keys() and _snapshot(path) != before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_never_replaces_other_files(fmt, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty directory holding no checkpoint"):
        save_pretrained(tiny_model("ViT-B-32"), tmp_path, format=fmt)
    with pytest.raises(ValueError, match="is a file"):
        save_pretrained(tiny_model("ViT-B-32"), tmp_path / "notes.txt", format=fmt)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# Command line --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_command(fmt, tmp_path, capsys):
    model = tiny_model("ViT-B-32")
    src = save_pretrained(model, tmp_path / "src")
    out = tmp_path / "out"
    assert cli.main(["convert", "--model", f"local-dir:{src}", "--to", fmt, str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"in the {fmt} layout to {out}" in printed
    assert all(p.name in printed for p in out.iterdir())
    back = load_open_clip_back(out) if fmt == "open_clip" else create_model(f"local-dir:{out}")
    assert_same_outputs(model, back, model.config)


def test_convert_command_errors(tmp_path, capsys):
    src = save_pretrained(tiny_model("RN50"), tmp_path / "src")
    assert cli.main(["convert", "--model", f"local-dir:{src}", "--to", "transformers", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipworks convert: error:") and "can be saved as clipworks or open_clip" in err
    assert not (tmp_path / "o").exists()
