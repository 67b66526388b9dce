"""transformers `CLIPModel` directories in clipworks: parity with transformers on tiny random models, round trips,
weight formats and error messages."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from clipworks.checkpoints.io import CheckpointError
from clipworks.checkpoints.transformers import (
    config_from_transformers,
    config_to_transformers,
    convert_from_transformers,
    convert_to_transformers,
    load_transformers_dir,
    preprocess_from_transformers,
)
from clipworks.config import OPENAI_MEAN, OPENAI_STD
from clipworks.factory import create_model
from clipworks.presets import get_preset
from clipworks.tokenizer import default_tokenizer
from reference import with_changes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

# Two ids past CLIP's vocabulary act as tokens added after training: one sits before the end token in ADDED_ROW,
# so argmax pooling and first-eos pooling pick different positions and a wrong pooling map cannot pass.
VOCAB = 49410
ADDED_ROW = [49406, 320, 49409, 2368, 49407]
CASES = [("quick_gelu", 2), ("gelu", 2), ("quick_gelu", 49407), ("gelu", 49407)]


def tiny_hf_config(act: str, eos: int):
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act=act, eos_token_id=eos, layer_norm_eps=1e-5)  # fmt: skip
    vision = dict(hidden_size=48, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act=act, layer_norm_eps=1e-6)  # fmt: skip
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=40)


@torch.no_grad()
def perturb(model: nn.Module) -> None:
    """Move norms, biases and the temperature off their init, so unit gains and zero biases cannot hide a swap."""
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.uniform_(0.5, 1.5)
        elif name.endswith("bias"):
            p.normal_(0, 0.1)
    model.logit_scale.fill_(3.3)


def build_hf(act: str, eos: int, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.CLIPModel(tiny_hf_config(act, eos))
    perturb(model)
    return model.eval()


def tokens() -> torch.Tensor:
    ids = default_tokenizer()(["a photo of a cat", "a diagram", "", "two dogs playing in the snow at night"])
    added = torch.zeros(1, ids.shape[1], dtype=ids.dtype)
    added[0, : len(ADDED_ROW)] = torch.tensor(ADDED_ROW)
    return torch.cat([ids, added])  # (5, 77)


def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def features(out) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding; 4.x a tensor.
    return out.pooler_output if hasattr(out, "pooler_output") else out


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-eos{e}" for a, e in CASES])
def saved(request, tmp_path_factory):
    """(transformers model, its save_pretrained directory)."""
    act, eos = request.param
    hf = build_hf(act, eos)
    path = tmp_path_factory.mktemp(f"hf-{act}-{eos}")
    hf.save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return hf, path


@torch.no_grad()
def assert_same_outputs(hf, ours, report: dict | None = None) -> None:
    x, t = images(), tokens()
    hf_image = F.normalize(features(hf.get_image_features(pixel_values=x)), dim=-1)
    hf_text = F.normalize(features(hf.get_text_features(input_ids=t)), dim=-1)
    out = ours(x, t)
    diffs = {
        "image": (hf_image - out.image_features).abs().max().item(),
        "text": (hf_text - out.text_features).abs().max().item(),
        "logits": (hf(input_ids=t, pixel_values=x).logits_per_image - out.logits()[0]).abs().max().item(),
    }
    hf_hidden = hf.text_model(input_ids=t, output_hidden_states=True)
    our_hidden = ours.encode_text_hidden(t)
    assert len(our_hidden.hidden_states) == len(hf_hidden.hidden_states) == hf.config.text_config.num_hidden_layers + 1
    diffs["hidden"] = max((a - b).abs().max().item() for a, b in zip(hf_hidden.hidden_states, our_hidden.hidden_states))
    diffs["last_hidden"] = (hf_hidden.last_hidden_state - our_hidden.last_hidden).abs().max().item()
    if report is not None:
        report.update(diffs)
    # Logits are scaled by exp(3.3) ~ 27: allow fp32 rounding at that magnitude.
    limits = {"image": 1e-5, "text": 1e-5, "logits": 27 * 2e-6, "hidden": 1e-5, "last_hidden": 1e-5}
    assert all(diffs[k] <= limits[k] for k in limits), diffs


def test_parity_with_transformers(saved, record_property):
    hf, path = saved
    ours = create_model(f"local-dir:{path}")
    expected = "argmax" if hf.config.text_config.eos_token_id == 2 else "eos"
    assert ours.config.text.pool == expected
    assert ours.logit_scale.item() == pytest.approx(3.3)
    report = {}
    assert_same_outputs(hf, ours, report)
    record_property("max_abs_diff", report)


def test_weights_round_trip(saved):
    hf, _ = saved
    sd = hf.state_dict()
    back = convert_to_transformers(convert_from_transformers(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # Older transformers versions saved the position_ids buffers: they are dropped, not reported as unknown.
    with_ids = {**sd, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    assert convert_from_transformers(with_ids).keys() == convert_from_transformers(sd).keys()


def test_config_round_trip(saved):
    hf, path = saved
    config = json.loads((path / "config.json").read_text())
    cfg = config_from_transformers(config)
    written = config_to_transformers(cfg)
    assert config_from_transformers(written) == cfg
    rebuilt = transformers.CLIPModel(transformers.CLIPConfig.from_dict(written)).eval()
    ours = create_model(f"local-dir:{path}")
    rebuilt.load_state_dict(convert_to_transformers(ours.state_dict()), strict=True)
    assert_same_outputs(rebuilt, ours)


def test_presets_round_trip():
    for name in ("ViT-B-32-quickgelu", "ViT-L-14", "ViT-g-14", "ViT-bigG-14"):
        cfg = get_preset(name)
        assert config_from_transformers(config_to_transformers(cfg)) == cfg, name
    # (SigLIP presets are written as SiglipModel configs: see test_parity_transformers_siglip.py)
    for name, problem in [("RN50", "'resnet' tower"), ("convnext_base", "'convnext' tower")]:
        with pytest.raises(ValueError, match=problem):
            config_to_transformers(get_preset(name))


def test_pytorch_bin_and_sharded_dirs(tmp_path):
    hf = build_hf("quick_gelu", 2, seed=3)
    hf.save_pretrained(tmp_path / "ref")
    _, _, expected = load_transformers_dir(tmp_path / "ref")

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    hf.config.to_json_file(bin_dir / "config.json")
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1

    for name in ("bin", "sharded"):
        _, _, sd = load_transformers_dir(tmp_path / name)
        assert sd.keys() == expected.keys(), name
        assert all(torch.equal(sd[k], expected[k]) for k in sd), name
    assert_same_outputs(hf, create_model(f"local-dir:{tmp_path / 'bin'}"))


def test_preprocess_config(tmp_path):
    old = {"crop_size": 336, "size": 336, "resample": 3, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    pp = preprocess_from_transformers(old)
    assert (pp.image_size, pp.mean, pp.std, pp.interpolation, pp.resize_mode) == (
        336, (0.5,) * 3, (0.25,) * 3, "bicubic", "shortest"
    )  # fmt: skip
    new = {"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224}, "resample": 2}
    pp = preprocess_from_transformers(new)
    assert (pp.image_size, pp.interpolation, pp.mean, pp.std) == (224, "bilinear", OPENAI_MEAN, OPENAI_STD)
    squash = {"size": {"height": 256, "width": 256}, "do_center_crop": False, "resample": 0}
    pp = preprocess_from_transformers(squash)
    assert (pp.image_size, pp.interpolation, pp.resize_mode) == (256, "nearest", "squash")
    with pytest.raises(CheckpointError, match="resample=1"):
        preprocess_from_transformers({"resample": 1})
    with pytest.raises(CheckpointError, match="size 256 with crop_size 224"):
        preprocess_from_transformers({"size": {"shortest_edge": 256}, "crop_size": 224})

    hf = build_hf("gelu", 49407)
    hf.save_pretrained(tmp_path)
    _, pp, _ = load_transformers_dir(tmp_path)  # no preprocessor_config.json: OpenAI's, at the model's size
    assert (pp.image_size, pp.mean, pp.std, pp.interpolation) == (32, OPENAI_MEAN, OPENAI_STD, "bicubic")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**new, "crop_size": 32, "size": 32}))
    assert load_transformers_dir(tmp_path)[1].interpolation == "bilinear"


def _hf_dict(**changes) -> dict:
    d = tiny_hf_config("gelu", 49407).to_dict()
    return with_changes(d, **changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "blip"}, "model_type='blip'"),
        ({"vision_config__hidden_act": "relu"}, "vision_config.hidden_act='relu'"),
        ({"vision_config__image_size": [32, 48]}, "vision_config.image_size=.*square"),
        ({"text_config__eos_token_id": [1, 2]}, "text_config.eos_token_id"),
    ],
)
def test_config_errors(changes, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_transformers(_hf_dict(**changes))


def test_directory_errors(tmp_path):
    hf = build_hf("gelu", 49407)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}

    def make(name: str, config: dict | str, weights: dict | None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if weights is not None:
            save_file(weights, str(d / "model.safetensors"))
        return f"local-dir:{d}"

    good = hf.config.to_dict()
    cases = [
        (make("noweights", good, None), r"no weights: expected model\.safetensors"),
        (make("blip", {**good, "model_type": "blip"}, sd), r"config\.json: model_type='blip' is not supported"),
        (make("badjson", "{not json", sd), r"config\.json: not readable JSON"),
        (make("lnshape", good, {**sd, "text_model.final_layer_norm.weight": torch.ones(63)}),
         r"shape mismatches \(1\): text\.ln_final\.weight: checkpoint \(63,\) vs model \(64,\)"),
        (make("qkvshape", good, {**sd, "vision_model.encoder.layers.1.self_attn.k_proj.weight": torch.ones(47, 48)}),
         r"q/k/v projections differ in shape: .*layers\.1\.self_attn\.k_proj\.weight': \(47, 48\)"),
        (make("extra", good, {**sd, "vision_model.head.weight": torch.ones(2)}),
         r"no conversion rule for 1 key\(s\): \['vision_model\.head\.weight'\]"),
    ]  # fmt: skip
    for name, message in cases:
        with pytest.raises(CheckpointError, match=message):
            create_model(name)
