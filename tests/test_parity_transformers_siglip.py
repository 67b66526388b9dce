"""transformers' SiglipModel, Siglip2Model and one-tower CLIP directories in clipworks, and SigLIP and one-tower models
written in transformers' layout: parity with transformers (and OpenCLIP) on tiny random models, round trips, one-tower
errors and unsupported fields."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from reference import open_clip_model, perturb_, tiny_config, with_changes

from clipworks import CLIP, get_preset
from clipworks.checkpoints.export import formats_for, save_pretrained
from clipworks.checkpoints.io import CheckpointError, load_weights
from clipworks.checkpoints.open_clip import convert_from_open_clip
from clipworks.checkpoints.transformers import config_from_transformers, config_to_transformers
from clipworks.config import SIGLIP_MEAN, SIGLIP_STD, PreprocessConfig
from clipworks.factory import create_model, create_model_and_transforms, default_preprocess, get_tokenizer
from clipworks.models.clip import MissingTowerError
from clipworks.presets import PRESETS
from clipworks.tokenizer import default_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOL = 1e-5
VOCAB, CONTEXT, PAD = 1000, 16, 1
SIGLIP_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=CONTEXT, projection_size=48, pad_token_id=PAD, eos_token_id=2,
                   bos_token_id=0)  # fmt: skip
SIGLIP_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
CLIP_TEXT = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, projection_dim=24,
                 hidden_act="gelu", layer_norm_eps=1e-5)  # fmt: skip
CLIP_VISION = dict(hidden_size=48, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8, projection_dim=24, hidden_act="quick_gelu", layer_norm_eps=1e-6)  # fmt: skip


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every tensor (norm gains around 1), so that no wrong key map or reshape can pass."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            gain = "norm" in name and name.endswith("weight")
            t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1.0 if gain else 0.0))


def siglip_ids(vocab: int = VOCAB, context: int = CONTEXT) -> torch.Tensor:
    """Texts of several lengths padded to the full context (SigLIP pools the last position, padding included)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.full((4, context), PAD, dtype=torch.long)
    for row, n in enumerate((3, 7, context, 1)):
        ids[row, :n] = torch.randint(2, vocab, (n,), generator=g)
    return ids


def pixels(side: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).abs().max().item()


def tiny_siglip(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.SiglipConfig(text_config=SIGLIP_TEXT, vision_config={**SIGLIP_VISION, "image_size": 32})
    model = transformers.SiglipModel(config).eval()
    perturb(model, seed)
    return model


@torch.no_grad()
def siglip_diffs(hf, ours, images: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Largest differences of normalised embeddings, and of logits relative to the logit scale."""
    out = ours(images, ids)
    logits = hf(input_ids=ids, pixel_values=images).logits_per_image
    return {
        "image": diff(hf.get_image_features(pixel_values=images).pooler_output, out.image_features),
        "text": diff(hf.get_text_features(input_ids=ids).pooler_output, out.text_features),
        "logits": (logits - out.logits()[0]).abs().max().item() / out.logit_scale.item(),
    }


# Reading SiglipModel and Siglip2Model -------------------------------------------------------------------------


def test_siglip_parity(tmp_path, record_property):
    hf = tiny_siglip()
    hf.save_pretrained(tmp_path)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2).save_pretrained(tmp_path)
    ours = create_model(f"local-dir:{tmp_path}")
    v, t = ours.config.vision, ours.config.text
    assert (v.pool, v.class_token, v.patch_bias, v.ln_pre, v.projection, v.act, v.norm_eps) == (
        "map", False, True, False, False, "gelu_tanh", 1e-6
    )  # fmt: skip
    assert (t.causal, t.pool, t.projection, t.proj_bias, t.act, t.context_length) == (
        False, "last", True, True, "gelu_tanh", CONTEXT
    )  # fmt: skip
    assert ours.config.embed_dim == 48 and ours.logit_bias is not None
    assert ours.preprocess_config == PreprocessConfig(32, SIGLIP_MEAN, SIGLIP_STD, "bilinear", "squash")
    diffs = siglip_diffs(hf, ours, pixels(32), siglip_ids())
    record_property("max_abs_diff", diffs)
    assert max(diffs.values()) <= TOL, diffs


def siglip2_model(seed: int = 0):
    torch.manual_seed(seed)
    vision = {**SIGLIP_VISION, "num_patches": 16}  # a 4 x 4 position table
    config = transformers.Siglip2Config(text_config=SIGLIP_TEXT, vision_config=vision)
    model = transformers.Siglip2Model(config).eval()
    perturb(model, seed)
    return model


@torch.no_grad()
def siglip2_image_features(hf, images: torch.Tensor) -> torch.Tensor:
    """transformers' Siglip2 features of square images: their patches as its processor flattens them, with the full
    attention mask and the square grid as spatial shape."""
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    p = hf.config.vision_config.patch_size
    grid = images.shape[-1] // p
    patches = torch.stack([convert_image_to_patches(image, p) for image in images])  # (B, grid * grid, p * p * 3)
    mask = torch.ones(len(images), grid * grid, dtype=torch.long)
    shapes = torch.tensor([[grid, grid]] * len(images))
    return hf.get_image_features(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output


# max_num_patches: the table's own 4 x 4 grid, a smaller (3 x 3, antialiased) and a larger (6 x 6) one
@pytest.mark.parametrize("max_num_patches, grid", [(16, 4), (10, 3), (36, 6)])
def test_siglip2_parity_at_the_processors_square_grid(max_num_patches, grid, tmp_path, record_property):
    from PIL import Image

    hf = siglip2_model()
    hf.save_pretrained(tmp_path / "hf")
    processor = transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=max_num_patches)
    processor.save_pretrained(tmp_path / "hf")
    # the grid clipworks chose is the one Siglip2's own processor gives a square image
    square = Image.new("RGB", (50, 50), (10, 200, 30))
    assert processor(images=square, return_tensors="pt")["spatial_shapes"].tolist() == [[grid, grid]]

    ours = create_model(f"local-dir:{tmp_path / 'hf'}")
    side = grid * 8
    assert ours.config.vision.image_size == side and ours.config.vision.pool == "map"
    assert ours.preprocess_config == PreprocessConfig(side, SIGLIP_MEAN, SIGLIP_STD, "bilinear", "squash")
    table = hf.vision_model.embeddings.position_embedding.weight
    if grid == 4:  # resizing to the table's own grid keeps it
        assert (ours.visual.pos_embed - table).abs().max() <= 1e-6
    images, ids = pixels(side), siglip_ids()
    with torch.no_grad():
        diffs = {
            "image": diff(siglip2_image_features(hf, images), ours.encode_image(images)),
            "text": diff(hf.get_text_features(input_ids=ids).pooler_output, ours.encode_text(ids)),
        }
    record_property("max_abs_diff", diffs)
    assert max(diffs.values()) <= TOL, diffs
    with pytest.raises(ValueError, match="takes .*square input.*NaFlex"):
        ours.encode_image(torch.zeros(1, 3, side, side + 8))

    # written back as a fixed-resolution SiglipModel, which transformers reads with the same outputs (this directory
    # has no tokenizer files to copy: the export goes on without them)
    with pytest.warns(UserWarning, match="the tokenizer's files were not written: no tokenizer.json"):
        path = save_pretrained(ours, tmp_path / "out", format="transformers")
    assert json.loads((path / "config.json").read_text())["architectures"] == ["SiglipModel"]
    written = transformers.SiglipModel.from_pretrained(path).eval()
    with torch.no_grad():
        assert diff(written.get_image_features(pixel_values=images).pooler_output, ours.encode_image(images)) <= TOL


def test_siglip2_from_the_hub(tmp_path, monkeypatch):
    """hf-hub: fetches config.json, the weights and preprocessor_config.json, whose max_num_patches sets the grid."""
    pytest.importorskip("huggingface_hub")
    from fakehub import serving

    hf = siglip2_model()
    hf.save_pretrained(tmp_path / "hf")
    transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=36).save_pretrained(tmp_path / "hf")
    files = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    with serving(monkeypatch, tmp_path / "home") as hub:
        hub.add_repo("org/tiny-siglip2", files)
        ours = create_model("hf-hub:org/tiny-siglip2")
    assert ours.config.vision.image_size == 48
    images = pixels(48)
    with torch.no_grad():
        assert diff(siglip2_image_features(hf, images), ours.encode_image(images)) <= TOL


# One-tower CLIP ------------------------------------------------------------------------------------------------


ONE_TOWER = ["CLIPVisionModelWithProjection", "CLIPVisionModel", "CLIPTextModelWithProjection", "CLIPTextModel"]


def one_tower_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    vision = "Vision" in name
    config = transformers.CLIPVisionConfig(**CLIP_VISION) if vision else transformers.CLIPTextConfig(**CLIP_TEXT)
    model = getattr(transformers, name)(config).eval()
    perturb(model, seed)
    return model


def clip_ids() -> torch.Tensor:
    return default_tokenizer()(["a photo of a cat", "", "two dogs playing in the snow at night"])


@torch.no_grad()
def one_tower_diff(hf, ours) -> float:
    """The largest difference of normalised features between a transformers one-tower model and ours."""
    if "Vision" in type(hf).__name__:
        x = pixels(32)
        out = hf(pixel_values=x)
        return diff(out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output, ours.encode_image(x))
    ids = clip_ids()
    out = hf(input_ids=ids)
    return diff(out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output, ours.encode_text(ids))


@pytest.mark.parametrize("name", ONE_TOWER)
def test_one_tower_clip_parity_and_round_trip(name, tmp_path, record_property):
    hf = one_tower_model(name)
    hf.save_pretrained(tmp_path / "hf")
    ours = create_model(f"local-dir:{tmp_path / 'hf'}")
    vision = "Vision" in name
    assert (ours.visual is None, ours.text is None) == (not vision, vision)
    tower = ours.config.vision if vision else ours.config.text
    assert tower.projection == name.endswith("WithProjection")
    record_property("max_abs_diff", one_tower_diff(hf, ours))
    assert one_tower_diff(hf, ours) <= TOL

    # the missing tower is a clear error wherever it would be used
    if vision:
        with pytest.raises(MissingTowerError, match="no text tower.*cannot encode texts"):
            ours.encode_text(clip_ids())
        with pytest.raises(MissingTowerError, match="image-only model"):
            get_tokenizer(ours)
        assert ours.preprocess_config == default_preprocess(ours.config)
    else:
        with pytest.raises(MissingTowerError, match="no image tower.*cannot encode images"):
            ours.encode_image(pixels(32))
        with pytest.raises(MissingTowerError, match="text-only model"):
            default_preprocess(ours.config)
        assert create_model_and_transforms(f"local-dir:{tmp_path / 'hf'}")[1:] == (None, None)
        assert ours.preprocess_config is None
    assert formats_for(ours) == ["clipworks", "transformers"]
    with pytest.raises(ValueError, match="two-tower models only; this model has no .* tower; this model can be saved "
                                         "as clipworks or transformers$"):  # fmt: skip
        save_pretrained(ours, tmp_path / "oc", format="open_clip")

    # written back as the same class, which transformers reads; and through clipworks' own layout
    path = save_pretrained(ours, tmp_path / "out", format="transformers")
    assert json.loads((path / "config.json").read_text())["architectures"] == [name]
    assert (path / "preprocessor_config.json").is_file() == vision
    assert one_tower_diff(getattr(transformers, name).from_pretrained(path).eval(), ours) <= TOL
    for fmt in ("transformers", "clipworks"):
        back = create_model(f"local-dir:{save_pretrained(ours, tmp_path / fmt, format=fmt)}")
        assert back.config == ours.config and back.preprocess_config == ours.preprocess_config
        expected = ours.state_dict()
        assert back.state_dict().keys() == expected.keys()
        assert all(torch.equal(back.state_dict()[k], expected[k]) for k in expected)


def test_clip_config_whose_architectures_name_one_tower(tmp_path):
    """A "clip" config.json (both sub-configs) whose architectures say CLIPVisionModelWithProjection: read as
    transformers reads it, the vision part only."""
    hf = one_tower_model("CLIPVisionModelWithProjection")
    hf.save_pretrained(tmp_path)
    config = transformers.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=24).to_dict()
    config["architectures"] = ["CLIPVisionModelWithProjection"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = create_model(f"local-dir:{tmp_path}")
    assert ours.text is None and ours.config.embed_dim == 24
    assert one_tower_diff(hf, ours) <= TOL
    assert one_tower_diff(transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval(), ours) <= TOL


# Writing SiglipModel -------------------------------------------------------------------------------------------


def tiny_clipworks(name: str, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(tiny_config(get_preset(name))).eval()
    perturb_(model, seed=seed)
    return model


# a SigLIP, a SigLIP 2 (tanh GELU text) and an i18n SO400M model (no text projection: written with an identity head)
@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "ViT-SO400M-16-SigLIP-i18n-256"])
def test_siglip_export_loads_in_transformers_and_back(name, tmp_path, record_property):
    model = tiny_clipworks(name)
    cfg = model.config
    path = save_pretrained(model, tmp_path / "hf", format="transformers")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["SiglipModel"] and config["model_type"] == "siglip"
    hf = transformers.SiglipModel.from_pretrained(path).eval()
    ids = siglip_ids(cfg.text.vocab_size, cfg.text.context_length)
    diffs = siglip_diffs(hf, model, pixels(cfg.vision.image_size), ids)
    record_property("max_abs_diff", diffs)
    assert max(diffs.values()) <= TOL, diffs
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    assert type(processor).__name__.startswith("SiglipImageProcessor")
    assert processor.crop_size["height"] == cfg.vision.image_size and tuple(processor.image_mean) == SIGLIP_MEAN

    back = create_model(f"local-dir:{path}")
    assert back.preprocess_config == default_preprocess(cfg)
    if cfg.text.projection:
        assert back.config == cfg
        expected = model.state_dict()
        assert back.state_dict().keys() == expected.keys()
        assert all(torch.equal(back.state_dict()[k], expected[k]) for k in expected)
    else:  # the identity head reads back as a projection
        assert back.config.text.projection and torch.equal(back.text.proj.weight, torch.eye(cfg.text.width))
    assert max(siglip_diffs(hf, back, pixels(cfg.vision.image_size), ids).values()) <= TOL


def test_siglip_export_copies_the_tokenizer_files(tmp_path):
    """A SiglipModel directory's own tokenizer travels with the model into its export."""
    tokenizer_files = pytest.importorskip("tokenizer_files")
    pytest.importorskip("sentencepiece")
    tiny_siglip().save_pretrained(tmp_path / "hf")
    tokenizer_files.build_siglip(tmp_path / "hf")
    ours = create_model(f"local-dir:{tmp_path / 'hf'}")
    assert ours.tokenizer_config.kind == "hf"
    out = save_pretrained(ours, tmp_path / "out", format="transformers")
    texts = ["a photo of a cat", "two dogs playing in the snow"]
    theirs, written = (transformers.AutoTokenizer.from_pretrained(p) for p in (tmp_path / "hf", out))
    assert written(texts)["input_ids"] == theirs(texts)["input_ids"]


def test_open_clip_siglip_exported_as_siglip_model_matches_open_clip(tmp_path, record_property):
    """OpenCLIP's SigLIP -> clipworks -> SiglipModel directory -> transformers: OpenCLIP's features."""
    pytest.importorskip("open_clip")
    cfg = tiny_config(get_preset("ViT-B-16-SigLIP"))
    torch.manual_seed(0)
    ref = open_clip_model(cfg).eval()
    perturb_(ref)
    model = CLIP(cfg).eval()
    load_weights(model, convert_from_open_clip(ref.state_dict(), cfg))
    hf = transformers.SiglipModel.from_pretrained(save_pretrained(model, tmp_path, format="transformers")).eval()
    images, ids = pixels(cfg.vision.image_size), siglip_ids(cfg.text.vocab_size, cfg.text.context_length)
    with torch.no_grad():
        scale = ref.logit_scale.exp()
        logits = scale * ref.encode_image(images, normalize=True) @ ref.encode_text(ids, normalize=True).t()
        hf_logits = hf(input_ids=ids, pixel_values=images).logits_per_image
        diffs = {
            "image": diff(hf.get_image_features(pixel_values=images).pooler_output, ref.encode_image(images)),
            "text": diff(hf.get_text_features(input_ids=ids).pooler_output, ref.encode_text(ids)),
            "logits": (hf_logits - logits - ref.logit_bias).abs().max().item() / scale.item(),
        }
    record_property("max_abs_diff", diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_siglip_presets_round_trip_through_siglip_configs():
    for name, cfg in PRESETS.items():
        if "SigLIP" not in name or cfg.text.kind != "transformer":
            continue
        config = config_to_transformers(cfg)
        assert config["model_type"] == "siglip", name
        # a text tower without projection is written with an identity head, so it reads back with one
        expected = cfg if cfg.text.projection else replace(cfg, text=replace(cfg.text, projection=True, proj_bias=True))
        assert config_from_transformers(config) == expected, name
        assert transformers.SiglipConfig.from_dict(config).vision_config.hidden_size == cfg.vision.width


def test_models_no_transformers_class_holds_say_which_formats_can(tmp_path):
    model = tiny_clipworks("ViT-B-16-SigLIP")
    causal = CLIP(replace(model.config, text=replace(model.config.text, causal=True)))
    assert "transformers" not in formats_for(causal)
    with pytest.raises(ValueError, match=r"SiglipModel: text\.causal must be False; this model can be saved as "
                                         r"clipworks( or open_clip)?$"):  # fmt: skip
        save_pretrained(causal, tmp_path / "c", format="transformers")
    assert "transformers" in formats_for(model)
    assert not (tmp_path / "c").exists()


# Unsupported fields --------------------------------------------------------------------------------------------


def _siglip_dict(model_type: str = "siglip", **changes) -> dict:
    vision = {**SIGLIP_VISION, "image_size": 32} if model_type == "siglip" else {**SIGLIP_VISION, "num_patches": 16}
    d = {"model_type": model_type, "text_config": dict(SIGLIP_TEXT), "vision_config": vision}
    return with_changes(d, **changes)


@pytest.mark.parametrize(
    "config, message",
    [
        (_siglip_dict(vision_config__num_channels=1), r"vision_config\.num_channels=1: .*RGB"),
        (_siglip_dict(vision_config__vision_use_head=False), r"vision_config\.vision_use_head=False is not supported"),
        (_siglip_dict(text_config__hidden_act="relu"), r"text_config\.hidden_act='relu' is not supported"),
        (_siglip_dict(vision_config__image_size=[32, 48]), r"vision_config\.image_size=\[32, 48\]: .*square"),
        (_siglip_dict(text_config__projection_size=40), r"text_config\.projection_size=40 differs"),
        (_siglip_dict("siglip2", vision_config__num_patches=15), r"vision_config\.num_patches=15: .*square grid"),
        (_siglip_dict("siglip2", vision_config__hidden_act="swish"), r"vision_config\.hidden_act='swish'"),
        (_siglip_dict("blip"), r"model_type='blip' is not supported; expected one of \['clip', "),
    ],
)
def test_unsupported_config_fields_are_named(config, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_transformers(config)


@pytest.mark.parametrize(
    "preprocessor, message",
    [
        ({"do_resize": False}, r"preprocessor_config\.json: do_resize=False .*NaFlex.*fixed-size square"),
        ({"patch_size": 16}, r"patch_size=16 differs from the model's 8"),
        ({"max_num_patches": 0}, r"max_num_patches=0: expected a positive integer"),
        ({"do_normalize": False}, r"do_normalize=False is not supported"),
    ],
)
def test_unsupported_siglip2_preprocessing_is_named(preprocessor, message, tmp_path):
    siglip2_model().save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_num_patches": 16, **preprocessor}))
    with pytest.raises(CheckpointError, match=message):
        create_model(f"local-dir:{tmp_path}")
