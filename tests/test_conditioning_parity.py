"""Diffusion text conditioning against diffusers' `encode_prompt` (SD 1.x and SDXL) on tiny random encoders."""

from __future__ import annotations

import gzip
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from clipworks.checkpoints.io import CheckpointError
from clipworks.conditioning import (
    ClipSkip,
    PromptReader,
    SDXLText,
    StableDiffusionText,
    build_text_encoder,
    encode_hidden,
    load_text_encoder,
    text_encoder_from_transformers,
)
from clipworks.tokenizer import _NUM_MERGES, VOCAB_PATH, default_tokenizer

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a photo of a cat", "an oil painting (of a lighthouse), at dusk, [storm]"]
NEGATIVES = ["blurry", ""]
# diffusers reads a prompt as plain text and cuts it at 75 tokens.
PLAIN = PromptReader(syntax="plain", truncate=True)


def hf_tokenizer(pad: str):
    """transformers' CLIPTokenizer on clipworks' shipped vocabulary (with transformers' special-token names)."""
    vocab = default_tokenizer()._vocab[:-2] + ["<|startoftext|>", "<|endoftext|>"]
    with gzip.open(VOCAB_PATH) as f:
        merges = [tuple(line.split()) for line in f.read().decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]]
    return transformers.CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=merges, pad_token=pad, model_max_length=77
    )


@torch.no_grad()
def hf_text_model(cls, width: int, act: str, seed: int):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                                         num_attention_heads=2, projection_dim=24, hidden_act=act)  # fmt: skip
    model = cls(config).eval()
    for p in model.parameters():  # move norms and biases off their init so no swapped key can pass
        p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def hf():
    enc = hf_text_model(transformers.CLIPTextModel, 32, "quick_gelu", 0)
    enc_2 = hf_text_model(transformers.CLIPTextModelWithProjection, 48, "gelu", 1)
    return enc, enc_2


@pytest.fixture(scope="module")
def pipelines(hf):
    enc, enc_2 = hf
    # diffusers 0.42's SD 1.x clip_skip path calls `text_encoder.text_model.final_layer_norm`, which transformers
    # 5's CLIPTextModel no longer has (its layers sit at the top level): give it that name, outside the module tree.
    if not hasattr(enc, "text_model"):
        object.__setattr__(enc, "text_model", SimpleNamespace(final_layer_norm=enc.final_layer_norm))
    tok, tok_2 = hf_tokenizer("<|endoftext|>"), hf_tokenizer("!")
    sdxl = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=enc, text_encoder_2=enc_2, tokenizer=tok,
                                               tokenizer_2=tok_2, unet=None, scheduler=None)  # fmt: skip
    sd = diffusers.StableDiffusionPipeline(vae=None, text_encoder=enc, tokenizer=tok, unet=None, scheduler=None,
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)  # fmt: skip
    return sd, sdxl


@pytest.fixture(scope="module")
def ours(hf):
    return text_encoder_from_transformers(hf[0]), text_encoder_from_transformers(hf[1])


def test_tokenizers_pad_as_diffusers_expects(pipelines):
    sd, sdxl = pipelines
    assert sdxl.tokenizer("a cat", padding="max_length", max_length=8).input_ids == [49406, 320, 2368] + [49407] * 5
    assert (
        sdxl.tokenizer_2("a cat", padding="max_length", max_length=8).input_ids == [49406, 320, 2368, 49407] + [0] * 4
    )


@pytest.mark.parametrize("clip_skip", [None, 1, 2])
def test_sd15_matches_diffusers(pipelines, ours, clip_skip):
    sd, _ = pipelines
    ref, ref_neg = sd.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVES, clip_skip=clip_skip)
    # diffusers reads negative prompts from the default layer whatever clip_skip says.
    out = StableDiffusionText(ours[0], PLAIN)(PROMPTS, NEGATIVES, layer=ClipSkip.diffusers(clip_skip),
                                             negative_layer=ClipSkip.diffusers())  # fmt: skip
    assert out.embeds.shape == ref.shape == (2, 77, 32)
    assert torch.equal(out.embeds, ref)
    assert torch.equal(out.negative_embeds, ref_neg)


@pytest.mark.parametrize("clip_skip", [None, 1, 2])
@pytest.mark.parametrize("negative", [None, NEGATIVES])
def test_sdxl_matches_diffusers(pipelines, ours, clip_skip, negative):
    _, sdxl = pipelines
    ref = sdxl.encode_prompt(PROMPTS, device="cpu", negative_prompt=negative, clip_skip=clip_skip)
    out = SDXLText(*ours, PLAIN)(PROMPTS, negative, layer=ClipSkip.sdxl(clip_skip), negative_layer=ClipSkip.sdxl())
    assert out.embeds.shape == (2, 77, 32 + 48) and out.pooled.shape == (2, 24)
    for got, want in zip(out, ref):
        assert torch.equal(got, want)
    if negative is None:  # force_zeros_for_empty_prompt
        assert not out.negative_embeds.any() and not out.negative_pooled.any()


def test_sdxl_separate_prompts_for_each_encoder(pipelines, ours):
    _, sdxl = pipelines
    ref = sdxl.encode_prompt(PROMPTS, prompt_2=["a dog", "a boat"], device="cpu", negative_prompt=NEGATIVES,
                             negative_prompt_2=["ugly", "dark"])  # fmt: skip
    out = SDXLText(*ours, PLAIN)(PROMPTS, NEGATIVES, ["a dog", "a boat"], ["ugly", "dark"])
    for got, want in zip(out, ref):
        assert torch.equal(got, want)


def test_default_reader_leaves_short_plain_prompts_unchanged(pipelines, ours):
    _, sdxl = pipelines
    prompts = ["a photo of a cat", "a red car, parked, in the rain"]
    ref = sdxl.encode_prompt(prompts, device="cpu", negative_prompt=["", "blurry"])
    out = SDXLText(*ours)(prompts, ["", "blurry"])
    for got, want in zip(out, ref):
        assert torch.equal(got, want)


def test_long_prompt_first_chunk_is_the_truncated_prompt(pipelines, ours):
    _, sdxl = pipelines
    long = " ".join(["cat"] * 120)  # 120 tokens, no comma: chunks of 75 and 45
    ref = sdxl.encode_prompt(long, device="cpu", negative_prompt="")
    out = SDXLText(*ours)(long, "")
    assert out.embeds.shape == (1, 154, 80) and out.negative_embeds.shape == (1, 154, 80)
    assert torch.equal(out.embeds[:, :77], ref[0])
    assert (out.pooled - ref[2]).abs().max() <= 1e-6  # a batch of 2 chunks: a different matmul, last-bit rounding
    assert torch.equal(out.negative_embeds[:, :77], ref[1]) and torch.equal(out.negative_embeds[:, 77:], ref[1])
    rest = " ".join(["cat"] * 45)
    assert torch.equal(out.embeds[:, 77:], sdxl.encode_prompt(rest, device="cpu", negative_prompt="")[0])


def test_every_hidden_state_and_pooled_equal_transformers(hf, ours):
    ids = default_tokenizer()(PROMPTS)
    for model, enc in zip(hf, ours):
        with torch.no_grad():
            ref = model(ids, output_hidden_states=True)
        want_pooled = ref[1] if isinstance(model, transformers.CLIPTextModel) else ref.text_embeds
        for index in (-1, -2, -3, -4):
            got = encode_hidden(enc, ids, ClipSkip(index, final_norm=False), pooled=True)
            assert torch.equal(got.hidden, ref.hidden_states[index])
            assert torch.equal(got.pooled, want_pooled)


def test_text_encoder_directories_and_state_dicts(hf, ours, tmp_path):
    ids = default_tokenizer()(PROMPTS)
    for i, (model, enc) in enumerate(zip(hf, ours)):
        model.save_pretrained(tmp_path / str(i))
        loaded = load_text_encoder(tmp_path / str(i))
        prefixed = {f"text_model.{k}" if not k.startswith(("text_model.", "text_projection")) else k: v
                    for k, v in model.state_dict().items()}  # fmt: skip  # transformers 4.x / hub layout
        rebuilt = build_text_encoder(model.config.to_dict(), prefixed)
        want = encode_hidden(enc, ids, ClipSkip(), pooled=True)
        for other in (loaded, rebuilt):
            got = encode_hidden(other, ids, ClipSkip(), pooled=True)
            assert torch.equal(got.hidden, want.hidden) and torch.equal(got.pooled, want.pooled)


def test_text_encoder_errors_are_named(hf, tmp_path):
    model = hf[1]
    with pytest.raises(CheckpointError, match="config.json: not readable JSON"):
        load_text_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    with pytest.raises(CheckpointError, match=r"no weights: expected one of \['model.fp16.safetensors'"):
        load_text_encoder(tmp_path, variant="fp16")
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.fp16.safetensors")
    assert load_text_encoder(tmp_path, variant="fp16").token_embed.weight.dtype == torch.float16
    with pytest.raises(CheckpointError, match="model_type='t5' is not a CLIP text model"):
        build_text_encoder({"model_type": "t5"}, model.state_dict())
    vision = {"vision_model.post_layernorm.weight": torch.ones(4), **model.state_dict()}
    with pytest.raises(CheckpointError, match="vision_model.post_layernorm.weight"):
        build_text_encoder(model.config.to_dict(), vision)
    partial = {k: v for k, v in model.state_dict().items() if "layers.2." not in k}
    with pytest.raises(CheckpointError, match="missing keys"):
        build_text_encoder(model.config.to_dict(), partial)


def test_truncating_reader_cuts_long_prompts_as_diffusers(pipelines, ours):
    sd, sdxl = pipelines
    prompts = [" ".join(["a red cat,"] * 40), "a dog"]  # 120 tokens, then 2
    ref = sdxl.encode_prompt(prompts, device="cpu", negative_prompt=["", "x " * 90])
    out = SDXLText(*ours, PLAIN)(prompts, ["", "x " * 90])
    for got, want in zip(out, ref):
        assert got.shape == want.shape and torch.equal(got, want)
    ref = sd.encode_prompt(prompts, "cpu", 1, True, None)
    out = StableDiffusionText(ours[0], PLAIN)(prompts)
    assert torch.equal(out.embeds, ref[0]) and torch.equal(out.negative_embeds, ref[1])
