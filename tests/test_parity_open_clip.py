"""Parity: reduced-size OpenCLIP models with random weights, saved to files, loaded by clipworks."""

import pytest
import torch
from safetensors.torch import save_file

import clipworks
from reference import open_clip_meta_model, open_clip_model, perturb_, tiny_config

open_clip = pytest.importorskip("open_clip")

FAMILIES = ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-g-14", "RN50", "RN50-quickgelu", "convnext_base_w",
            "ViT-B-16-SigLIP", "ViT-SO400M-16-SigLIP-i18n-256", "ViT-B-16-SigLIP2", "ViT-gopt-16-SigLIP2-256",
            "ViT-H-14-worldwide-quickgelu", "ViT-SO400M-14-SigLIP-384", "convnext_large_d", "convnext_xxlarge",
            "ViT-B-16-plus-240", "ViT-L-14-CLIPA"]  # fmt: skip
CAPTIONS = ["a photo of a cat", "", "A DOG on the grass, 3 birds!", "x " * 100, "émoji 🐶 和 &amp; text"]


def _tokens(cfg):
    t = cfg.text
    if t.vocab_size == 49408 and t.pool == "argmax":
        return open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)
    # Other vocabularies are not shipped: random ids laid out as their tokenizers lay them out (text, the end token,
    # then padding), with the lengths the captions would have.
    g = torch.Generator().manual_seed(1)
    tokens = torch.full((len(CAPTIONS), t.context_length), t.pad_id)
    for row, n in enumerate([6, 1, 12, t.context_length - 1, 9]):
        tokens[row, :n] = torch.randint(3, t.vocab_size, (n,), generator=g)
        tokens[row, n] = t.eos_id
    return tokens


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("name", FAMILIES)
def test_outputs_match_open_clip(name, fmt, tmp_path):
    cfg = tiny_config(clipworks.get_preset(name))
    torch.manual_seed(0)
    ref = open_clip_model(cfg).eval()
    perturb_(ref)
    sd = ref.state_dict()
    path = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)

    model = clipworks.create_model(cfg, pretrained=path)
    assert not model.training

    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = _tokens(cfg)
    with torch.no_grad():
        ref_img = ref.encode_image(images, normalize=True)
        ref_txt = ref.encode_text(tokens, normalize=True)
        out = model(images, tokens)
    assert (out.image_features - ref_img).abs().max() <= 1e-5
    assert (out.text_features - ref_txt).abs().max() <= 1e-5
    ref_logits = ref.logit_scale.exp() * ref_img @ ref_txt.t()
    if cfg.init_logit_bias is not None:
        ref_logits = ref_logits + ref.logit_bias
    # logits are scaled by exp(logit_scale): compare relative to that scale
    assert (out.logits()[0] - ref_logits).abs().max() <= 1e-5 * ref.logit_scale.exp().item()


def test_export_to_open_clip_layout_round_trips():
    from clipworks.checkpoints.open_clip import convert_from_open_clip, convert_to_open_clip

    for name in FAMILIES:
        cfg = tiny_config(clipworks.get_preset(name))
        sd = open_clip_model(cfg).state_dict()
        back = convert_to_open_clip(convert_from_open_clip(sd, cfg), cfg)
        assert set(back) == set(sd), name
        assert all(torch.equal(back[k], sd[k]) for k in sd), name


@pytest.mark.parametrize("name", [n for n in clipworks.list_models()])
def test_full_size_parameter_count_equals_reference(name):
    ref = open_clip_meta_model(name)
    with torch.device("meta"):
        ours = clipworks.CLIP(clipworks.get_preset(name))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
