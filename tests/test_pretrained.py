"""The pretrained registry: entries fit presets, OpenAI's releases say QuickGELU, and it agrees with OpenCLIP's."""

import re

import pytest

import clipworks
from clipworks import pretrained
from clipworks.config import OPENAI_MEAN, OPENAI_STD
from clipworks.pretrained import get_pretrained, list_pretrained

OPENAI_MODELS = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]
ENTRIES = [get_pretrained(m, t) for m, t in list_pretrained()]


def test_every_entry_fits_a_preset():
    models = set(clipworks.list_models())
    for e in ENTRIES:
        assert e.model in models and e.preset in models, (e.model, e.tag)
        assert e.preprocess.image_size == clipworks.get_preset(e.preset).vision.image_size, (e.model, e.tag)
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", e.hf_hub), e.hf_hub
        # OpenCLIP's own file names, or the one file a release's repository holds (ViTamin: transformers' name)
        named = (e.filename, e.fallback_filename) == ("pytorch_model.bin", None)
        assert named or e.filename.endswith(".safetensors") and e.fallback_filename in (None, "open_clip_pytorch_model.bin")
        assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256)
        assert e.preset.endswith("-quickgelu") == e.quick_gelu, (e.model, e.tag)


@pytest.mark.parametrize("model", OPENAI_MODELS)
def test_openai_releases_use_quickgelu_and_openai_preprocessing(model):
    for name in (model, f"{model}-quickgelu"):
        assert "openai" in [t for _, t in list_pretrained(name)]
        e = get_pretrained(name, "openai")
        assert e.quick_gelu and e.preset == f"{model}-quickgelu"
        pp = e.preprocess
        assert (pp.mean, pp.std, pp.interpolation, pp.resize_mode) == (OPENAI_MEAN, OPENAI_STD, "bicubic", "shortest")
        assert e.hf_hub.startswith("timm/") and e.hf_hub.endswith(".openai")


def test_release_specific_preprocessing():
    assert get_pretrained("ViT-L-14", "laion2b_s32b_b82k").preprocess.mean == (0.5, 0.5, 0.5)
    assert get_pretrained("ViT-H-14", "dfn5b").preprocess.resize_mode == "squash"
    assert get_pretrained("ViT-B-16-SigLIP", "webli").preprocess.std == (0.5, 0.5, 0.5)


def test_list_pretrained():
    assert list_pretrained() == sorted(list_pretrained()) and len(list_pretrained()) == len(set(list_pretrained()))
    vit_b_32 = list_pretrained("ViT-B-32")
    assert vit_b_32 == sorted(vit_b_32) and {m for m, _ in vit_b_32} == {"ViT-B-32"}
    tags = {t for _, t in vit_b_32}
    assert {"openai", "laion400m_e31", "laion400m_e32", "laion2b_e16", "laion2b_s34b_b79k", "datacomp_xl_s13b_b90k",
            "metaclip_400m", "metaclip_fullcc", "commonpool_m_clip_s128m_b4k", "commonpool_s_s13m_b4k"} <= tags
    assert len(tags) == 22
    assert [t for _, t in list_pretrained("ViT-g-14")] == ["laion2b_s12b_b42k", "laion2b_s34b_b88k"]
    assert {t for _, t in list_pretrained("ViT-B-32-quickgelu")} == {
        "openai", "laion400m_e31", "laion400m_e32", "metaclip_400m", "metaclip_fullcc"
    }  # fmt: skip


def test_tags_are_matched_as_openclip_matches_them():
    assert get_pretrained("ViT-B-32", "LAION2B-s34B-b79K").tag == "laion2b_s34b_b79k"


def test_unknown_tag_lists_the_models_tags():
    with pytest.raises(ValueError, match="unknown pretrained tag 'laion2b'") as e:
        get_pretrained("ViT-H-14", "laion2b")
    for tag in ("laion2b_s32b_b79k", "metaclip_fullcc", "metaclip_altogether", "dfn5b"):
        assert tag in str(e.value)


def test_unknown_model_gives_the_preset_message():
    with pytest.raises(ValueError) as expected:
        clipworks.get_preset("ViT-B-33")
    with pytest.raises(ValueError) as got:
        get_pretrained("ViT-B-33", "openai")
    assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError, match="did you mean"):
        list_pretrained("ViT-B-33")


def test_model_without_weights_says_so(monkeypatch):
    kept = {k: v for k, v in pretrained._ENTRIES.items() if k[0] != "convnext_base"}
    monkeypatch.setattr(pretrained, "_ENTRIES", kept)
    assert list_pretrained("convnext_base") == []
    with pytest.raises(ValueError, match=r"'convnext_base' has no pretrained weights.*ViT-B-32"):
        get_pretrained("convnext_base", "laion400m_s13b_b51k")


def test_agrees_with_open_clips_registry():
    """Every OpenCLIP release of a clipworks preset is listed, with the same hub repo, preprocessing and activation."""
    op = pytest.importorskip("open_clip.pretrained")
    models = set(clipworks.list_models())
    theirs = {(m, t) for m, t in op.list_pretrained() if m in models}
    assert theirs == set(list_pretrained())
    for model, tag in sorted(theirs):
        cfg, e = op.get_pretrained_cfg(model, tag), get_pretrained(model, tag)
        repo, _, filename = cfg["hf_hub"].partition("/")[2].partition("/")
        assert f"{cfg['hf_hub'].split('/')[0]}/{repo}" == e.hf_hub and filename in ("", e.filename), (model, tag)
        assert tuple(cfg["mean"]) == e.preprocess.mean and tuple(cfg["std"]) == e.preprocess.std, (model, tag)
        assert (cfg["interpolation"], cfg["resize_mode"]) == (e.preprocess.interpolation, e.preprocess.resize_mode)
        assert cfg.get("quick_gelu", False) == e.quick_gelu, (model, tag)
