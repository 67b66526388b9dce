"""The Hugging Face text towers (RoBERTa, XLM-R, mT5, NLLB) run natively: parity with OpenCLIP's HFTextEncoder and with
transformers' own encoders on reduced-size models, the OpenCLIP layout and configs both ways, padding trim, gradient
checkpointing, int8 and `forward_hidden`."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from reference import (
    HF_MODEL_TYPES,
    open_clip_hf_model,
    open_clip_meta_model,
    perturb_,
    tiny_config,
    transformers_config,
)
from safetensors.torch import save_file

import clipworks
from clipworks.checkpoints import open_clip_hf
from clipworks.checkpoints.io import CheckpointError, load_weights
from clipworks.checkpoints.open_clip import convert_from_open_clip, convert_to_open_clip
from clipworks.checkpoints.open_clip_dir import config_from_open_clip, config_to_open_clip
from clipworks.models.hf_text import HFTextTower
from clipworks.models.quant import Int8Linear, quantize_int8

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

HF_PRESETS = ["roberta-ViT-B-32", "xlm-roberta-base-ViT-B-32", "xlm-roberta-large-ViT-H-14", "mt5-base-ViT-B-32",
              "mt5-xl-ViT-H-14", "nllb-clip-base", "nllb-clip-large", "nllb-clip-base-siglip", "nllb-clip-large-siglip"]
# case -> (preset, transformers model type, pool, proj_type): every family, every pooling and projection
CASES = {
    "roberta-mean-mlp": ("roberta-ViT-B-32", "roberta", "mean", "mlp"),
    "xlmr-cls-linear": ("xlm-roberta-base-ViT-B-32", "xlm-roberta", "cls", "linear"),
    "xlmr-first-none": ("xlm-roberta-base-ViT-B-32", "xlm-roberta", "first", "none"),
    "mt5-mean-mlp": ("mt5-base-ViT-B-32", "mt5", "mean", "mlp"),
    "mt5-cls-linear": ("mt5-base-ViT-B-32", "mt5", "cls", "linear"),
    "nllb-cls-linear": ("nllb-clip-base", "m2m_100", "cls", "linear"),
    "nllb-mean-mlp": ("nllb-clip-base", "m2m_100", "mean", "mlp"),
    "nllb-siglip": ("nllb-clip-base-siglip", "m2m_100", "cls", "linear"),
}
FAMILY_CASES = ["roberta-mean-mlp", "xlmr-cls-linear", "mt5-mean-mlp", "nllb-cls-linear"]
TOL = 1e-5


def case_config(case: str):
    preset, model_type, pool, proj = CASES[case]
    cfg = tiny_config(clipworks.get_preset(preset))
    cfg = replace(cfg, text=replace(cfg.text, pool=pool, proj_type=proj))
    if proj == "none":  # the identity needs embed_dim == width
        cfg = replace(cfg, embed_dim=cfg.text.width)
    return cfg, model_type


def real_tokens(t, model_type: str, lengths=(5, 0, 20, None, 9)) -> torch.Tensor:
    """Random text ids laid out as each tokenizer lays them out: RoBERTa/XLM-R <s> text </s> <pad>..., mT5 text </s>
    <pad>..., NLLB lang_code text </s> <pad>...; `None` fills the context, 0 is a text with specials only."""
    g = torch.Generator().manual_seed(0)
    L = t.context_length
    tokens = torch.full((len(lengths), L), t.pad_id)
    for row, n in enumerate(lengths):
        n = L - (1 if model_type == "mt5" else 2) if n is None else n
        text = torch.randint(3, t.vocab_size - 1, (n,), generator=g).tolist()
        ids = {"mt5": text + [1], "m2m_100": [t.vocab_size - 1, *text, 2]}.get(model_type, [0, *text, 2])
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens


def reference(case: str):
    cfg, model_type = case_config(case)
    torch.manual_seed(0)
    ref = open_clip_hf_model(cfg, model_type).eval()
    perturb_(ref)
    return cfg, model_type, ref


def tiny_model(case: str) -> clipworks.CLIP:
    cfg, _ = case_config(case)
    torch.manual_seed(0)
    model = clipworks.CLIP(cfg)
    perturb_(model, std=0.1)
    return model


# Parity with OpenCLIP --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_open_clip(case, tmp_path, record_property):
    cfg, model_type, ref = reference(case)
    sd = ref.state_dict()
    assert any(k.startswith("text.transformer.") for k in sd) and ("text.transformer.pooler.dense.weight" in sd) == (
        model_type in ("roberta", "xlm-roberta") and cfg.text.pool == "cls"
    )  # fmt: skip
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.bin")
    tokens = real_tokens(cfg.text, model_type)
    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_txt, ref_img = ref.encode_text(tokens, normalize=True), ref.encode_image(images, normalize=True)
    for fmt in ("safetensors", "bin"):
        model = clipworks.create_model(cfg, pretrained=tmp_path / f"w.{fmt}")
        with torch.no_grad():
            out = model(images, tokens)
        diffs = {"text": (out.text_features - ref_txt).abs().max().item(),
                 "image": (out.image_features - ref_img).abs().max().item()}  # fmt: skip
        record_property(f"max_abs_diff_{fmt}", diffs)
        assert max(diffs.values()) <= TOL, diffs
        assert not torch.isnan(out.text_features).any()
    # and back: OpenCLIP's state dict, key for key
    back = convert_to_open_clip(model.state_dict(), cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_checkpoints_saved_by_older_transformers_load():
    """transformers < 4.31 saved RoBERTa's position_ids with the weights (OpenCLIP drops them on load; so do we)."""
    cfg, model_type, ref = reference("roberta-mean-mlp")
    sd = {**ref.state_dict(), "text.transformer.embeddings.position_ids": torch.arange(514)[None]}
    model = clipworks.CLIP(cfg)
    load_weights(model, convert_from_open_clip(sd, cfg))
    assert "text.transformer.embeddings.position_ids" not in convert_to_open_clip(model.state_dict(), cfg)


def test_keys_of_another_layout_are_named():
    cfg, _, ref = reference("xlmr-cls-linear")  # holds BERT's pooler
    mean = replace(cfg, text=replace(cfg.text, pool="mean"))
    with pytest.raises(ValueError, match=r"no conversion rule.*transformer\.pooler\.dense\.bias"):
        convert_from_open_clip(ref.state_dict(), mean)
    nllb, _ = case_config("nllb-cls-linear")
    with pytest.raises(ValueError, match="no conversion rule"):
        convert_from_open_clip(ref.state_dict(), replace(nllb, vision=cfg.vision))


# Parity with transformers' own encoders --------------------------------------------------------------------------


def transformers_encoder(cfg, model_type: str):
    config = transformers_config(cfg.text, model_type)
    if model_type == "mt5":
        return transformers.MT5EncoderModel(config).encoder  # the stack OpenCLIP holds
    if model_type == "m2m_100":
        return transformers.M2M100Model(config).encoder
    return transformers.AutoModel.from_config(config, add_pooling_layer=cfg.text.pool == "cls")


@pytest.mark.parametrize("case", FAMILY_CASES)
@torch.no_grad()
def test_encoder_matches_transformers(case, record_property):
    cfg, model_type = case_config(case)
    torch.manual_seed(0)
    hf = transformers_encoder(cfg, model_type).eval()
    perturb_(hf)
    tower = clipworks.CLIP(cfg).text.eval()
    theirs = {f"transformer.{k}": v for k, v in hf.state_dict().items()}
    ours = open_clip_hf.convert_from_open_clip(theirs, cfg.text)
    load_weights(tower, {**ours, **{k: v for k, v in tower.state_dict().items() if k.startswith("proj.")}})

    tokens = real_tokens(cfg.text, model_type)
    out = hf(input_ids=tokens, attention_mask=(tokens != cfg.text.pad_id).long(), output_hidden_states=True)
    hidden = tower.forward_hidden(tokens)
    assert len(hidden.hidden_states) == len(out.hidden_states) == cfg.text.layers + 1
    # transformers' last hidden state is after the final norm where the family has one (T5, M2M100); ours is the last
    # block's output, with the final-norm states in `last_hidden`
    diffs = {
        "hidden": max((a - b).abs().max().item() for a, b in zip(hidden.hidden_states[:-1], out.hidden_states[:-1])),
        "last": (hidden.last_hidden - out.last_hidden_state).abs().max().item(),
        "last_states": (tower.ln_final(hidden.hidden_states[-1]) - out.hidden_states[-1]).abs().max().item(),
    }
    if getattr(out, "pooler_output", None) is not None:
        first = hidden.last_hidden[:, 0]
        diffs["pooler"] = (torch.tanh(tower.pooler(first)) - out.pooler_output).abs().max().item()
    record_property("max_abs_diff", diffs)
    assert max(diffs.values()) <= TOL, diffs


# The tower's own contract ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_padding_trim_changes_nothing(case, monkeypatch):
    model = tiny_model(case).eval()
    _, model_type = case_config(case)
    t = model.config.text
    tokens = real_tokens(t, model_type, lengths=(5, 0, 11))
    assert model.text.trim(tokens).shape[1] == 13 - (model_type == "mt5")  # the longest row, specials included
    trimmed = model.encode_text(tokens)
    assert torch.equal(trimmed, model.encode_text(tokens[:, :30]))  # any amount of padding: the same input
    monkeypatch.setattr(model.text, "trim", lambda tokens: tokens)
    full = model.encode_text(tokens)
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.encode_text_hidden(tokens).pooled, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_grad_checkpointing_same_outputs_and_grads(case):
    model = tiny_model(case).train()
    _, model_type = case_config(case)
    tokens = real_tokens(model.config.text, model_type)

    def run():
        model.zero_grad()
        out = model.encode_text(tokens)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.text.named_parameters() if p.grad is not None}

    plain = run()
    model.set_grad_checkpointing(True)
    ckpt = run()
    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=1e-6)
    assert plain[1].keys() == ckpt[1].keys() and len(plain[1]) == len(list(model.text.parameters()))
    for name in plain[1]:
        torch.testing.assert_close(ckpt[1][name], plain[1][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", FAMILY_CASES)
@torch.no_grad()
def test_int8_stays_close_to_fp32(case):
    model = tiny_model(case).eval()
    _, model_type = case_config(case)
    int8 = quantize_int8(copy.deepcopy(model))
    linears_per_block = 7 if model_type == "mt5" else 6  # q, k, v, out, (gate,) fc1, fc2
    want = linears_per_block * model.config.text.layers + 4 * model.config.vision.layers
    assert sum(isinstance(m, Int8Linear) for m in int8.modules()) == want
    tokens = real_tokens(model.config.text, model_type)
    a, b = model.encode_text(tokens, normalize=True), int8.encode_text(tokens, normalize=True)
    cos = (a * b).sum(-1)
    assert cos.min() > 0.99 and not torch.equal(a, b), cos


@pytest.mark.parametrize("case", FAMILY_CASES)
@torch.no_grad()
def test_forward_hidden_shapes(case):
    model = tiny_model(case).eval()
    cfg, model_type = case_config(case)
    t = cfg.text
    tokens = real_tokens(t, model_type, lengths=(3, 7))
    hidden = model.encode_text_hidden(tokens)
    assert len(hidden.hidden_states) == t.layers + 1
    assert all(h.shape == (2, t.context_length, t.width) for h in hidden.hidden_states)
    assert hidden.last_hidden.shape == (2, t.context_length, t.width) and hidden.pooled.shape == (2, cfg.embed_dim)
    assert isinstance(model.text, HFTextTower) and model.context_length == t.context_length == 77


def test_too_long_for_the_position_table():
    model = tiny_model("roberta-mean-mlp")
    tokens = torch.full((1, 513), 5)
    with pytest.raises(ValueError, match="length 513 exceed the 512 positions"):
        model.encode_text(tokens)


# Configs ---------------------------------------------------------------------------------------------------------


def _open_clip_json(name: str) -> dict:
    return json.loads((Path(open_clip.__file__).parent / "model_configs" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", HF_PRESETS)
def test_open_clip_configs_are_the_presets_and_write_back(name):
    theirs = _open_clip_json(name)
    assert config_from_open_clip(theirs) == clipworks.get_preset(name)
    ours = config_to_open_clip(clipworks.get_preset(name))
    hf_keys = ("hf_model_name", "hf_proj_type", "hf_pooler_type")
    defaults = {"hf_proj_type": "mlp", "hf_pooler_type": "mean_pooler"}  # OpenCLIP's CLIPTextCfg defaults
    assert {k: ours["text_cfg"][k] for k in hf_keys} == {k: theirs["text_cfg"].get(k, defaults.get(k)) for k in hf_keys}
    assert ours.get("quick_gelu", False) == theirs.get("quick_gelu", False)
    assert ours.get("custom_text", False) == theirs.get("custom_text", False)
    assert clipworks.get_preset(f"{name}").text.context_length == 77


def test_unsupported_options_are_named():
    base = _open_clip_json("nllb-clip-base")
    for key, value, match in [
        ("hf_model_name", "bert-base-uncased", r"hf_model_name='bert-base-uncased' is not supported.*roberta-base"),
        ("hf_pooler_type", "max_pooler", r"hf_pooler_type='max_pooler'.*cannot run.*mean_pooler"),
        ("hf_proj_type", "mlp2", r"hf_proj_type='mlp2' is not supported.*'linear'"),
    ]:
        cfg = {**base, "text_cfg": {**base["text_cfg"], key: value}}
        with pytest.raises(CheckpointError, match=match):
            config_from_open_clip(cfg)
    # a null pooler is the architecture's default in OpenCLIP (hf_configs.arch_dict): cls for M2M100, mean for mT5
    assert config_from_open_clip({**base, "text_cfg": {**base["text_cfg"], "hf_pooler_type": None}}).text.pool == "cls"
    mt5 = _open_clip_json("mt5-base-ViT-B-32")
    assert config_from_open_clip({**mt5, "text_cfg": {**mt5["text_cfg"], "hf_pooler_type": None}}).text.pool == "mean"
    # None is OpenCLIP's identity projection
    cfg = {**base, "embed_dim": 1024, "text_cfg": {**base["text_cfg"], "hf_proj_type": None}}
    assert config_from_open_clip(cfg).text.proj_type == "none"
    assert config_to_open_clip(config_from_open_clip(cfg))["text_cfg"]["hf_proj_type"] is None
    # a size no named model has cannot be written as an OpenCLIP config
    with pytest.raises(ValueError, match="sizes of none of the Hugging Face models"):
        config_to_open_clip(tiny_config(clipworks.get_preset("nllb-clip-base")))


def test_config_round_trips_through_dict():
    for name in HF_PRESETS:
        cfg = clipworks.get_preset(name)
        assert clipworks.CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# Full size -------------------------------------------------------------------------------------------------------

# Parameter counts of the whole Hugging Face models (encoder, decoder, heads) as their hub pages give them. mT5 keeps a
# separate output embedding (vocab x width) that transformers 5 ties on construction, so it is added back here.
PUBLISHED = {"roberta-base": 125e6, "xlm-roberta-base": 278e6, "xlm-roberta-large": 560e6, "google/mt5-base": 582e6,
             "google/mt5-xl": 3.74e9, "facebook/nllb-200-distilled-600M": 615e6,
             "facebook/nllb-200-distilled-1.3B": 1.37e9}  # fmt: skip


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_hf_model_table_gives_the_published_sizes(name):
    t = open_clip_hf.HF_TEXT_MODELS[name]
    config = transformers_config(t, HF_MODEL_TYPES[name])
    with torch.device("meta"):
        if t.kind == "bert":
            model = transformers.AutoModel.from_config(config)
        else:
            model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    count = sum(p.numel() for p in model.parameters()) + (t.vocab_size * t.width if t.kind == "t5" else 0)
    assert float(f"{count:.3g}") == PUBLISHED[name], count


@pytest.mark.parametrize("name", HF_PRESETS)
def test_full_size_keys_and_shapes_equal_open_clips(name):
    """OpenCLIP's model of the preset (meta device), converted: every key and shape of clipworks' model, and back."""
    ref = open_clip_meta_model(name).state_dict()
    cfg = clipworks.get_preset(name)
    with torch.device("meta"):
        ours = clipworks.CLIP(cfg).state_dict()
    converted = convert_from_open_clip(ref, cfg)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert convert_to_open_clip(ours, cfg).keys() == ref.keys()
