"""SD3 and Flux text conditioning (CLIP + T5) against diffusers' `encode_prompt` on tiny random encoders."""

from __future__ import annotations

import gzip
import warnings

import pytest
import torch

from clipworks.checkpoints.io import CheckpointError
from clipworks.conditioning import (
    ClipSkip,
    FluxText,
    PromptReader,
    SD3Text,
    load_t5_encoder,
    t5_encoder_from_transformers,
    text_encoder_from_transformers,
)
from clipworks.hf_tokenizer import HFTokenizer
from clipworks.tokenizer import _NUM_MERGES, VOCAB_PATH, default_tokenizer
from tokenizer_files import train_sentencepiece

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a photo of a cat", "an oil painting (of a lighthouse), at dusk, [storm]"]
NEGATIVES = ["blurry", ""]
LONG = ["a red dog " * 30, "a cat"]  # 90 CLIP tokens: cut at 75 (diffusers) and at max_sequence_length by T5
PLAIN = PromptReader(syntax="plain", truncate=True)  # diffusers reads plain text, cut at 75 tokens
# T5's unscaled attention logits and gated feed-forward make float32 rounding reach 1.4e-5 at one element of 21k over
# 256 positions (the same tower in float64 agrees with transformers to 1e-15 once its RMSNorm's float32 variance is
# taken out); everything else agrees within 1e-5.
TOL = 2e-5


def clip_tokenizer(pad: str):
    """transformers' CLIPTokenizer on clipworks' shipped vocabulary (with transformers' special-token names)."""
    vocab = default_tokenizer()._vocab[:-2] + ["<|startoftext|>", "<|endoftext|>"]
    with gzip.open(VOCAB_PATH) as f:
        merges = [tuple(line.split()) for line in f.read().decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]]
    return transformers.CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=merges, pad_token=pad, model_max_length=77
    )


@torch.no_grad()
def perturbed(model):
    for p in model.parameters():  # move norms off their init so no swapped key can pass
        p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def clip_model(cls, width: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                                         num_attention_heads=2, projection_dim=width - 2,
                                         hidden_act="gelu")  # fmt: skip
    return perturbed(cls(config))


def t5_model(vocab_size: int, seed: int = 3):
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=vocab_size, d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=64,
                                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                   relative_attention_max_distance=20)  # fmt: skip
    return perturbed(transformers.T5EncoderModel(config))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A T5 v1.1-style tokenizer (unigram SentencePiece: pad 0, eos 1, unk 2; sentinel ids) saved as tokenizer.json."""
    root = tmp_path_factory.mktemp("t5tok")
    (root / "src").mkdir()
    (root / "src" / "spiece.model").write_bytes(
        train_sentencepiece("unigram", 200, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    )
    transformers.T5TokenizerFast.from_pretrained(root / "src", extra_ids=8).save_pretrained(root / "t5")
    return root / "t5"


@pytest.fixture(scope="module")
def hf(t5_dir):
    t5_tok = transformers.T5TokenizerFast.from_pretrained(t5_dir)
    return {
        "clip_l": clip_model(transformers.CLIPTextModelWithProjection, 12, 0),
        "clip_g": clip_model(transformers.CLIPTextModelWithProjection, 16, 1),
        "flux_clip": clip_model(transformers.CLIPTextModel, 12, 2),
        "t5": t5_model(len(t5_tok)),
        "t5_tok": t5_tok,
    }


@pytest.fixture(scope="module")
def pipes(hf):
    """diffusers' pipelines with only their text components (transformer, VAE and scheduler None)."""
    tok, tok_2 = clip_tokenizer("<|endoftext|>"), clip_tokenizer("!")
    sd3 = diffusers.StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, text_encoder=hf["clip_l"],
                                             tokenizer=tok, text_encoder_2=hf["clip_g"], tokenizer_2=tok_2,
                                             text_encoder_3=hf["t5"], tokenizer_3=hf["t5_tok"])  # fmt: skip
    flux = diffusers.FluxPipeline(scheduler=None, vae=None, text_encoder=hf["flux_clip"], tokenizer=tok,
                                  text_encoder_2=hf["t5"], tokenizer_2=hf["t5_tok"], transformer=None)  # fmt: skip
    return sd3, flux


@pytest.fixture(scope="module")
def ours(hf, t5_dir):
    t5 = t5_encoder_from_transformers(hf["t5"].config.to_dict(), hf["t5"].state_dict())
    tok = HFTokenizer(t5_dir)
    clip_l, clip_g, flux_clip = (text_encoder_from_transformers(hf[k]) for k in ("clip_l", "clip_g", "flux_clip"))
    return SD3Text(clip_l, clip_g, t5, tok, PLAIN), FluxText(flux_clip, t5, tok, PLAIN)


def assert_close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want.detach(), atol=TOL, rtol=TOL)


def test_t5_encoder_matches_transformers(hf):
    model = hf["t5"]
    ids = torch.randint(3, model.config.vocab_size, (2, 24))
    ids[1, 10:] = 0
    ours = t5_encoder_from_transformers(model.config.to_dict(), model.state_dict())
    with torch.no_grad():
        assert_close(ours(ids), model(ids)[0])  # no mask: padding attended to, as SD3 and Flux run it
        mask = (ids != 0).long()
        assert_close(ours(ids, mask), model(ids, attention_mask=mask)[0])
    tied = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}  # shared.weight only
    assert torch.equal(t5_encoder_from_transformers(model.config.to_dict(), tied)(ids), ours(ids))


@pytest.mark.parametrize("clip_skip", [None, 1])
@pytest.mark.parametrize("negative", [None, NEGATIVES])
def test_sd3_matches_diffusers(pipes, ours, clip_skip, negative):
    ref = pipes[0].encode_prompt(PROMPTS, None, None, device="cpu", negative_prompt=negative, clip_skip=clip_skip)
    # diffusers reads negative prompts from the default layer whatever clip_skip says.
    out = ours[0](PROMPTS, negative, layer=ClipSkip.sdxl(clip_skip), negative_layer=ClipSkip.sdxl())
    assert out.embeds.shape == (2, 77 + 256, 32) and out.pooled.shape == (2, 10 + 14)
    assert not out.embeds[:, :77, 28:].any()  # CLIP's 12 + 16 features zero-padded to T5's 32
    for got, want in zip(out, ref):
        assert_close(got, want)


def test_sd3_long_prompts_cut_and_separate_prompts(pipes, ours):
    kwargs = dict(max_sequence_length=16, num_images_per_prompt=2)
    ref = pipes[0].encode_prompt(LONG, ["a dog", "a boat"], None, device="cpu", negative_prompt=NEGATIVES,
                                 negative_prompt_2=["ugly", "dark"], negative_prompt_3=["x", "y"],
                                 **kwargs)  # fmt: skip
    with pytest.warns(UserWarning, match="max_sequence_length=16"):
        out = ours[0](LONG, NEGATIVES, ["a dog", "a boat"], None, ["ugly", "dark"], ["x", "y"], **kwargs)
    assert out.embeds.shape == (4, 77 + 16, 32)
    for got, want in zip(out, ref):
        assert_close(got, want)


@pytest.mark.parametrize("max_sequence_length", [None, 16])
def test_flux_matches_diffusers(pipes, ours, max_sequence_length):
    kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    prompts = LONG if max_sequence_length else PROMPTS
    ref = pipes[1].encode_prompt(prompts, device="cpu", num_images_per_prompt=2, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ours[1](prompts, num_images_per_prompt=2, **kwargs)
    assert len(caught) == (1 if max_sequence_length else 0)  # the long prompt is cut at 16 T5 tokens
    assert out.embeds.shape == (4, max_sequence_length or 512, 32) and out.pooled.shape == (4, 12)
    for got, want in zip(out, ref):
        assert_close(got, want)
    ref = pipes[1].encode_prompt(PROMPTS, ["snow", "rain"], device="cpu", max_sequence_length=8)
    for got, want in zip(ours[1](PROMPTS, ["snow", "rain"], max_sequence_length=8), ref):
        assert_close(got, want)


def test_a1111_syntax_weights_clip_only(ours):
    sd3, flux = ours
    a1111 = SD3Text(*sd3.clips, sd3.t5, sd3.t5_tokenizer, max_sequence_length=16)
    weighted = a1111(["a (red:1.5) fox BREAK snow"])
    plain = SD3Text(*sd3.clips, sd3.t5, sd3.t5_tokenizer, PLAIN, max_sequence_length=16)(["a red fox   snow"])
    assert weighted.embeds.shape == (1, 2 * 77 + 16, 32)  # BREAK: two CLIP chunks
    assert torch.equal(weighted.embeds[:, -16:], plain.embeds[:, -16:])  # T5 reads the text without the syntax
    assert not torch.allclose(weighted.embeds[:, :77], plain.embeds[:, :77])
    flux_a1111 = FluxText(flux.clip_l, flux.t5, flux.t5_tokenizer, max_sequence_length=16)
    assert torch.equal(flux_a1111(["a (red:1.5) fox"]).embeds, flux(["a red fox"], max_sequence_length=16).embeds)


def test_sd3_without_t5(ours):
    sd3 = ours[0]
    out = SD3Text(*sd3.clips, None, None, PLAIN, max_sequence_length=8, t5_width=40)(PROMPTS)
    assert out.embeds.shape == (2, 77 + 8, 40) and not out.embeds[:, 77:].any()


def test_load_t5_encoder_sharded_and_single(hf, tmp_path):
    model = hf["t5"]
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        for name in ("single", "sharded"):
            assert_close(load_t5_encoder(tmp_path / name)(ids), model(ids)[0])
    with pytest.raises(CheckpointError, match="has no weights"):
        load_t5_encoder(tmp_path / "single", variant="fp16")


def test_bad_input(hf, ours):
    config, sd = hf["t5"].config.to_dict(), hf["t5"].state_dict()
    with pytest.raises(CheckpointError, match="feed_forward_proj='relu'"):
        t5_encoder_from_transformers({**config, "feed_forward_proj": "relu"}, sd)
    with pytest.raises(CheckpointError, match="model_type='clip_text_model' is not a T5"):
        t5_encoder_from_transformers(hf["clip_l"].config.to_dict(), sd)
    with pytest.raises(CheckpointError, match="belong to another model"):
        t5_encoder_from_transformers(config, {**sd, "text_model.x": sd["shared.weight"]})
    with pytest.raises(ValueError, match="max_sequence_length must be an int >= 1"):
        ours[1]("a cat", max_sequence_length=0)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        ours[0]("a cat", num_images_per_prompt=0)
    with pytest.raises(ValueError, match="one each"):
        ours[0](["a cat", "a dog"], negative_prompts=["x"])


def test_textual_inversion_reaches_the_clip_towers_only(ours):
    from clipworks.conditioning import Embedding

    sd3, flux = ours
    g = torch.Generator().manual_seed(7)
    widths = [enc.token_embed.weight.shape[1] for enc in sd3.clips]
    pair = Embedding("zqxstyle", tuple(torch.randn(2, w, generator=g) for w in widths))  # SDXL-style clip_l/clip_g
    with_it = SD3Text(*sd3.clips, sd3.t5, sd3.t5_tokenizer, PromptReader(embeddings=[pair]), max_sequence_length=16)
    without = SD3Text(*sd3.clips, sd3.t5, sd3.t5_tokenizer, PromptReader(), max_sequence_length=16)
    a, b = with_it(["a fox, zqxstyle"]), without(["a fox, zqxstyle"])
    assert not torch.allclose(a.embeds[:, :77], b.embeds[:, :77]) and not torch.allclose(a.pooled, b.pooled)
    assert torch.equal(a.embeds[:, 77:], b.embeds[:, 77:])  # T5 reads the trigger as text
    assert torch.equal(with_it(["a fox"]).embeds, without(["a fox"]).embeds)  # no trigger: unchanged
    one = Embedding("zqxstyle", (torch.randn(3, flux.clip_l.token_embed.weight.shape[1], generator=g),))
    flux_with = FluxText(flux.clip_l, flux.t5, flux.t5_tokenizer, PromptReader(embeddings=[one]), max_sequence_length=32)
    flux_without = FluxText(flux.clip_l, flux.t5, flux.t5_tokenizer, PromptReader(), max_sequence_length=32)
    assert not torch.allclose(flux_with(["zqxstyle fox"]).pooled, flux_without(["zqxstyle fox"]).pooled)


def test_a_transformers_t5_is_accepted_as_given(hf, ours):
    sd3, flux = ours
    given = SD3Text(*sd3.clips, hf["t5"], sd3.t5_tokenizer, PLAIN, max_sequence_length=64)
    assert torch.equal(given(PROMPTS).embeds, SD3Text(*sd3.clips, sd3.t5, sd3.t5_tokenizer, PLAIN,
                                                      max_sequence_length=64)(PROMPTS).embeds)  # fmt: skip
    flux_given = FluxText(flux.clip_l, hf["t5"], flux.t5_tokenizer, PLAIN, max_sequence_length=64)
    assert torch.equal(flux_given(PROMPTS).embeds, flux(PROMPTS, max_sequence_length=64).embeds)
    with pytest.raises(ValueError, match="expected a clipworks T5Encoder or a transformers T5EncoderModel"):
        FluxText(flux.clip_l, torch.nn.Linear(2, 2), flux.t5_tokenizer)
