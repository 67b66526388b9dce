"""Textual inversion against diffusers' `load_textual_inversion` + `encode_prompt` on tiny random encoders, and
the embedding loader's refusals."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipworks.checkpoints.io import CheckpointError
from clipworks.conditioning import (
    Embedding,
    PromptReader,
    SDXLText,
    StableDiffusionText,
    load_embedding,
    text_encoder_from_transformers,
)

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
from test_conditioning_parity import hf_text_model, hf_tokenizer  # noqa: E402

TOK = "<tok>"
PROMPTS = ["<tok> a cat", "a photo of <tok> in the snow", "<tok> and <tok>, oil painting"]
NEGATIVES = ["blurry <tok>", "", "ugly"]
PLAIN = dict(syntax="plain", truncate=True)


@pytest.fixture(scope="module")
def base():
    """Tiny SD 1.x / SDXL towers and tokenizers; each test copies them (diffusers resizes what it loads into)."""
    enc = hf_text_model(transformers.CLIPTextModel, 32, "quick_gelu", 0)
    enc_2 = hf_text_model(transformers.CLIPTextModelWithProjection, 48, "gelu", 1)
    return enc, enc_2, hf_tokenizer("<|endoftext|>"), hf_tokenizer("!")


def sd_pipeline(base):
    enc, _, tok, _ = copy.deepcopy(base)
    pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=enc, tokenizer=tok, unet=None, scheduler=None,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)  # fmt: skip
    return pipe, text_encoder_from_transformers(base[0])


def sdxl_pipeline(base):
    enc, enc_2, tok, tok_2 = copy.deepcopy(base)
    pipe = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=enc, text_encoder_2=enc_2, tokenizer=tok,
                                               tokenizer_2=tok_2, unet=None, scheduler=None)  # fmt: skip
    return pipe, (text_encoder_from_transformers(base[0]), text_encoder_from_transformers(base[1]))


def vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write(tmp_path: Path, layout: str, n: int, width: int = 32) -> Path:
    """An embedding file in one of the layouts found in the wild."""
    v = vectors(n, width, n)
    if layout == "a1111_pt":
        path = tmp_path / "mystyle.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(v)},
                    "name": "mystyle", "step": 3000, "sd_checkpoint": "abc"}, path)  # fmt: skip
    elif layout == "a1111_safetensors":
        path = tmp_path / "mystyle.safetensors"
        save_file({"emb_params": v}, path)
    elif layout == "diffusers_safetensors":
        path = tmp_path / "learned_embeds.safetensors"
        save_file({TOK: v[0] if n == 1 else v}, path)  # one vector is stored (D,)
    else:
        path = tmp_path / "learned_embeds.bin"
        torch.save({TOK: v}, path)
    return path


LAYOUTS = ["a1111_pt", "a1111_safetensors", "diffusers_safetensors", "diffusers_bin"]


@pytest.mark.parametrize("layout, n", [(LAYOUTS[0], 1), (LAYOUTS[0], 3), (LAYOUTS[1], 3), (LAYOUTS[2], 1),
                                       (LAYOUTS[2], 3), (LAYOUTS[3], 3)])  # fmt: skip
def test_sd15_matches_diffusers(base, tmp_path, layout, n):
    pipe, ours = sd_pipeline(base)
    path = write(tmp_path, layout, n)
    pipe.load_textual_inversion(str(path), token=TOK)
    ref, ref_neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVES)
    text = StableDiffusionText(ours, PromptReader(**PLAIN, embeddings=[load_embedding(path, trigger=TOK)]))
    out = text(PROMPTS, NEGATIVES)
    assert out.embeds.shape == ref.shape == (3, 77, 32)
    assert (out.embeds - ref).abs().max() <= 1e-5 and (out.negative_embeds - ref_neg).abs().max() <= 1e-5
    assert torch.equal(out.embeds, ref)  # the same sums in the same order: exact on CPU
    plain = StableDiffusionText(ours, PromptReader(**PLAIN))(PROMPTS, NEGATIVES)
    assert not torch.equal(plain.embeds, out.embeds)  # the vectors did change the prompts
    assert torch.equal(plain.negative_embeds[1], out.negative_embeds[1])  # "" has no trigger: untouched


@pytest.mark.parametrize("n", [1, 3])
def test_sdxl_matches_diffusers(base, tmp_path, n):
    pipe, ours = sdxl_pipeline(base)
    path = tmp_path / "style_xl.safetensors"
    save_file({"clip_l": vectors(n, 32, 1), "clip_g": vectors(n, 48, 2)}, path)
    state = load_file(path)  # diffusers loads an SDXL file with one call per tokenizer and tower
    pipe.load_textual_inversion(state["clip_l"], token=TOK, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=TOK, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)  # fmt: skip
    ref = pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt=NEGATIVES)
    out = SDXLText(*ours, PromptReader(**PLAIN, embeddings=[load_embedding(path, trigger=TOK)]))(PROMPTS, NEGATIVES)
    assert out.embeds.shape == (3, 77, 80) and out.pooled.shape == (3, 24)
    for got, want in zip(out, ref):
        assert (got - want).abs().max() <= 1e-5
        assert torch.equal(got, want)


def test_long_weighted_prompt_keeps_an_embedding_in_one_chunk(base, tmp_path):
    pipe, ours = sd_pipeline(base)
    path = write(tmp_path, "diffusers_bin", 3)
    pipe.load_textual_inversion(str(path))
    reader = PromptReader(embeddings=[load_embedding(path)])
    prompt = " ".join(["cat"] * 74) + " (<tok>:1.3) dog"  # 74 tokens, then 3 vectors that do not fit in 75
    (first, second) = reader.chunks([prompt])[0]
    assert len(first.ids) == 74 and second.ids[:3] == [49408, 49409, 49410] and second.weights[:4] == [1.3] * 3 + [1]
    out = StableDiffusionText(ours, reader)(prompt.replace(":1.3", ":1"))  # weight 1: compare with diffusers
    assert out.embeds.shape == (1, 154, 32)
    ref, _ = pipe.encode_prompt("<tok> dog", "cpu", 1, True, "")
    assert torch.equal(out.embeds[:, 77:], ref)
    weighted = StableDiffusionText(ours, reader)(prompt).embeds
    assert torch.equal(weighted[:, :77], out.embeds[:, :77]) and not torch.equal(weighted[:, 77:], out.embeds[:, 77:])


def test_prompts_without_a_trigger_are_unchanged(base, tmp_path):
    _, ours = sdxl_pipeline(base)
    emb = Embedding("mystyle", (vectors(2, 32, 0), vectors(2, 48, 1)))
    prompts = ["a (red:1.2) fox, BREAK snow", "mystyles are words, not the trigger"]
    out = SDXLText(*ours, PromptReader(embeddings=[emb]))(prompts, ["blurry", ""])
    ref = SDXLText(*ours)(prompts, ["blurry", ""])
    for got, want in zip(out, ref):
        assert torch.equal(got, want)


def test_triggers_match_whole_words_in_any_case(tmp_path):
    reader = PromptReader(embeddings=[Embedding("mystyle", (vectors(2, 32, 0),)), Embedding(TOK, (vectors(1, 32, 1),))])
    ids = [chunks[0].ids for chunks in reader.chunks(["MyStyle, x", "mystyles", "a<TOK>b"])]
    assert ids[0][:3] == [49408, 49409, 267]  # mystyle's 2 vectors, then the comma
    assert 49408 not in ids[1]  # part of a longer word: not the trigger (A1111; diffusers would split it)
    assert ids[2][1] == 49410  # "<tok>" needs no spaces around it, as in diffusers


def test_default_triggers(tmp_path):
    assert load_embedding(write(tmp_path, "a1111_pt", 2)).trigger == "mystyle"  # A1111: the file name
    assert load_embedding(write(tmp_path, "a1111_safetensors", 2)).trigger == "mystyle"
    emb = load_embedding(write(tmp_path, "diffusers_safetensors", 1))  # diffusers' fixed name: its key
    assert emb.trigger == TOK and emb.vectors[0].shape == (1, 32)
    xl = tmp_path / "xl.safetensors"
    save_file({"clip_g": vectors(2, 48, 0), "clip_l": vectors(2, 32, 0)}, xl)
    assert [v.shape[1] for v in load_embedding(xl).vectors] == [32, 48]  # clip_l first, whatever the file order


class Payload:
    def __reduce__(self):
        return (exec, (f"open({str(MARK)!r}, 'w').close()",))


MARK = Path("/nonexistent")


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_pickled_code_is_refused(tmp_path):
    global MARK
    MARK = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:  # protocol 2, torch.save's
        pickle.dump({"string_to_param": {"*": Payload()}, "name": "evil"}, f, protocol=2)
    with pytest.raises(CheckpointError) as e:
        load_embedding(path)
    assert "weights_only" in one_line_error(e) and not MARK.exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_empty_file_is_refused(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    with pytest.raises(CheckpointError) as e:
        load_embedding(path)
    assert "empty" in one_line_error(e)


def test_wrong_width_names_both(base, tmp_path):
    _, ours = sd_pipeline(base)
    with pytest.raises(ValueError) as e:
        StableDiffusionText(ours, PromptReader(embeddings=[load_embedding(write(tmp_path, "a1111_pt", 2, width=40))]))
    message = one_line_error(e)
    assert "40" in message and "32" in message
    xl = Embedding("<xl>", (vectors(1, 32, 0), vectors(1, 48, 0)))
    with pytest.raises(ValueError, match="SDXL embedding"):
        StableDiffusionText(ours, PromptReader(embeddings=[xl]))


def test_trigger_already_in_the_vocabulary_is_refused(base, tmp_path):
    path = write(tmp_path, "diffusers_bin", 1)
    pipe, _ = sd_pipeline(base)
    with pytest.raises(ValueError, match="already in tokenizer vocabulary"):
        pipe.load_textual_inversion(str(path), token="cat")  # diffusers refuses too
    with pytest.raises(ValueError) as e:
        PromptReader(embeddings=[load_embedding(path, trigger="cat")])
    assert "already a token of the vocabulary" in one_line_error(e)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"a": torch.zeros(2, 32), "b": torch.zeros(2, 32)}, "not a textual-inversion embedding"),
        ({"string_to_param": {"*": torch.zeros(2, 32), "x": torch.zeros(2, 32)}}, "one tensor"),
        ({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(3, 48)}, r"\[2, 3\] vectors"),
        ({"emb_params": torch.zeros(76, 32)}, "1 to 75"),
        ({"emb_params": torch.zeros(2, 3, 32)}, r"\(D,\) or \(n, D\)"),
        ({"emb_params": torch.zeros(2, 32, dtype=torch.long)}, "float tensors"),
    ],
)
def test_malformed_embeddings_are_refused(tmp_path, data, match):
    path = tmp_path / "bad.safetensors"
    save_file(data if "string_to_param" not in data else {"x": torch.zeros(1)}, path)
    if "string_to_param" in data:
        path = tmp_path / "bad.pt"
        torch.save(data, path)
    with pytest.raises(ValueError, match=match) as e:
        load_embedding(path)
    one_line_error(e)


def test_duplicate_triggers_are_refused():
    one = Embedding("mystyle", (vectors(1, 32, 0),))
    with pytest.raises(ValueError, match="two embeddings"):
        PromptReader(embeddings=[one, Embedding("MyStyle", (vectors(1, 32, 1),))])
