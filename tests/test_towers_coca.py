"""CoCa: the attentional-pool image tower, the text tower with its appended class embedding and the caption decoder,
against OpenCLIP's CoCa (reduced sizes, random weights); its layouts and exports."""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

import clipworks
from clipworks import CLIP, CLIPConfig, get_preset
from clipworks.checkpoints.export import formats_for, save_pretrained
from clipworks.checkpoints.open_clip import convert_from_open_clip, convert_to_open_clip
from clipworks.models.quant import quantize_int8
from reference import open_clip_model, perturb_, tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
open_clip = pytest.importorskip("open_clip")

COCA = ["coca_ViT-B-32", "coca_ViT-L-14", "coca_base"]
# Varied lengths: padding after short captions, an empty one, and one cut at the context length (no padding at all,
# where the class position sees itself under OpenCLIP's shifted mask).
CAPTIONS = ["a photo of a cat", "", "A DOG on the grass, 3 birds!", "x " * 100, "émoji 🐶 和 &amp; text"]
TOL = 1e-5


def _tokens() -> torch.Tensor:
    return open_clip.get_tokenizer("coca_ViT-B-32")(CAPTIONS)  # (5, 76), padded with 0


def _reference(name: str, seed: int = 0):
    cfg = tiny_config(get_preset(name))
    torch.manual_seed(seed)
    ref = open_clip_model(cfg).eval()
    perturb_(ref, seed=seed)
    return cfg, ref


@torch.no_grad()
def _diffs(ref, model, cfg) -> dict[str, float]:
    """Largest differences of normalised embeddings, and of caption logits relative to their largest magnitude
    (all positions, and OpenCLIP's default teacher-forcing output, which drops the last)."""
    images = torch.randn(len(CAPTIONS), 3, cfg.vision.image_size, cfg.vision.image_size,
                         generator=torch.Generator().manual_seed(1))  # fmt: skip
    tokens = _tokens()
    out = {
        "image": ref.encode_image(images, normalize=True) - model.encode_image(images, normalize=True),
        "text": ref.encode_text(tokens, normalize=True) - model.encode_text(tokens, normalize=True),
    }
    theirs = ref(images, tokens, output_labels=False)["logits"]
    ours = model.caption_logits(images, tokens) if isinstance(model, CLIP) else model(images, tokens, output_labels=False)["logits"]
    teacher = ref(images, tokens)["logits"]  # (B, L - 1, V): positions a label follows
    scale = theirs.abs().max()
    out["logits"] = (theirs - ours) / scale
    out["logits_teacher_forcing"] = (teacher - ours[:, :-1]) / scale
    return {k: v.abs().max().item() for k, v in out.items()}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("name", COCA)
def test_outputs_match_open_clip(name, fmt, tmp_path, record_property):
    cfg, ref = _reference(name)
    path = tmp_path / f"weights.{fmt}"
    sd = ref.state_dict()
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    model = clipworks.create_model(cfg, pretrained=path)
    assert not model.training and model.decoder is not None
    diffs = _diffs(ref, model, cfg)
    record_property("max_abs_diff", diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_tokenizer_is_open_clips():
    ours = clipworks.get_tokenizer("coca_ViT-B-32")
    assert ours.context_length == 76 == open_clip.get_tokenizer("coca_ViT-B-32").context_length
    assert torch.equal(ours(CAPTIONS), _tokens())
    assert clipworks.get_tokenizer("coca_ViT-L-14:laion2b_s13b_b90k").context_length == 76


def test_text_pooling_sees_padding_as_open_clips_coca_was_trained():
    """OpenCLIP's CoCa masks padding one place late (`correct_cls_mask=False`, as its weights were trained): the class
    position sees the first padding position, and itself only after a full-length text. Its corrected mask (not what
    the releases were trained with) gives other features."""
    cfg, ref = _reference("coca_ViT-B-32")
    model = CLIP(cfg).eval()
    model.load_state_dict(convert_from_open_clip(ref.state_dict(), cfg))
    tokens = _tokens()[:1]  # "a photo of a cat": 7 ids (start and end too), then padding
    mask = model.text.key_mask(tokens)[0, 0]  # (77, 77)
    assert mask[-1, :8].all() and not mask[-1, 8:].any()  # the 7 ids and the first padding position; not itself
    tokens = _tokens()
    with torch.no_grad():
        ours = model.encode_text(tokens, normalize=True)
        assert (ours - ref.encode_text(tokens, normalize=True)).abs().max() <= TOL
        ref.text.correct_cls_mask = True
        corrected = ref.encode_text(tokens, normalize=True)
    assert (ours - corrected)[[0, 1, 2, 4]].abs().amax(-1).min() > 1e-3  # every padded caption differs
    assert (ours - corrected)[3].abs().max() <= TOL  # the full-length one has no padding to mask


def test_layout_round_trips_both_ways():
    for name in COCA:
        cfg, ref = _reference(name)
        sd = ref.state_dict()
        back = convert_to_open_clip(convert_from_open_clip(sd, cfg), cfg)
        assert back.keys() == sd.keys(), name
        assert all(_same(back[k], sd[k]) for k in sd), name
    # keys as wide as the queries: nn.MultiheadAttention packs the pool's q, k and v weights into one tensor
    cfg = tiny_config(get_preset("coca_ViT-B-32"))
    cfg = replace(cfg, vision=replace(cfg.vision, width=cfg.embed_dim))
    sd = open_clip_model(cfg).state_dict()
    assert "visual.attn_pool.attn.in_proj_weight" in sd
    back = convert_to_open_clip(convert_from_open_clip(sd, cfg), cfg)
    assert back.keys() == sd.keys() and all(_same(back[k], sd[k]) for k in sd)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN: OpenCLIP builds CoCa's `text_decoder.text_projection` with
    torch.empty and never initialises it, so it holds whatever memory held (NaN at times)."""
    return torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def test_decoder_keys_on_a_clip_config_are_named():
    cfg, ref = _reference("coca_ViT-B-32")
    plain = replace(cfg, decoder=None)
    with pytest.raises(ValueError, match="text_decoder"):
        convert_from_open_clip(ref.state_dict(), plain)


@pytest.mark.parametrize("name", ["coca_ViT-B-32", "coca_base"])
def test_open_clip_export_loads_in_open_clip(name, tmp_path, record_property):
    cfg, ref = _reference(name)
    model = CLIP(cfg).eval()
    model.load_state_dict(convert_from_open_clip(ref.state_dict(), cfg))
    assert formats_for(model) == ["clipworks", "open_clip"]
    path = save_pretrained(model, tmp_path / "oc", format="open_clip")
    oc = open_clip.create_model(f"local-dir:{path}").eval()
    assert type(oc).__name__ == "CoCa"
    expected, got = ref.state_dict(), oc.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    diffs = _diffs(oc, model, cfg)
    record_property("max_abs_diff_open_clip", diffs)
    assert max(diffs.values()) <= TOL, diffs

    back = clipworks.create_model(f"local-dir:{path}")
    assert back.config == cfg
    assert clipworks.get_tokenizer(f"local-dir:{path}").context_length == 76
    assert max(_diffs(ref, back, cfg).values()) <= TOL


def test_clipworks_export_round_trips(tmp_path):
    cfg, ref = _reference("coca_ViT-B-32")
    model = CLIP(cfg).eval()
    model.load_state_dict(convert_from_open_clip(ref.state_dict(), cfg))
    back = clipworks.create_model(f"local-dir:{save_pretrained(model, tmp_path / 'cw')}")
    assert back.config == cfg and back.config.decoder == cfg.decoder
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    assert max(_diffs(ref, back, cfg).values()) <= TOL


def test_transformers_format_is_refused_clearly(tmp_path):
    model = CLIP(tiny_config(get_preset("coca_ViT-B-32")))
    with pytest.raises(ValueError, match="CoCa.*no transformers class.*can be saved as clipworks or open_clip$"):
        save_pretrained(model, tmp_path / "hf", format="transformers")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name", COCA)
def test_config_round_trips_and_others_are_unchanged(name):
    cfg = get_preset(name)
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["decoder"]["width"] == cfg.text.width
    assert "decoder" not in get_preset("ViT-B-32").to_dict()  # configs without a decoder read as before
    assert clipworks.presets.preset_family(name) == "CoCa"


def test_caption_logits_need_a_decoder():
    model = CLIP(tiny_config(get_preset("ViT-B-32")))
    assert model.decoder is None
    with pytest.raises(ValueError, match="no caption decoder"):
        model.caption_logits(torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long))


def test_towers_that_cannot_feed_the_decoder_are_refused():
    cfg = tiny_config(get_preset("coca_ViT-B-32"))
    with pytest.raises(ValueError, match="decoder.width 48 must equal the text width 32"):
        CLIP(replace(cfg, decoder=replace(cfg.decoder, width=48)))
    with pytest.raises(ValueError, match="pool='cls'"):
        CLIP(replace(cfg, text=replace(cfg.text, pool="argmax")))
    with pytest.raises(ValueError, match="decoder.vocab_size 100 differs"):
        clipworks.checkpoints.open_clip_dir.config_to_open_clip(replace(cfg, decoder=replace(cfg.decoder, vocab_size=100)))


def test_decoder_checkpointing_gives_the_same_logits_and_grads():
    cfg = tiny_config(get_preset("coca_ViT-B-32"))
    torch.manual_seed(0)
    model = CLIP(cfg).train()
    images, tokens = torch.randn(2, 3, 32, 32), _tokens()[:2]

    def run():
        model.zero_grad()
        logits = model.caption_logits(images, tokens)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = run()
    model.set_grad_checkpointing(True)
    ckpt = run()
    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=1e-6)
    assert ckpt[1].keys() == plain[1].keys() and any(n.startswith("decoder.cross_blocks") for n in plain[1])
    for n in plain[1]:
        torch.testing.assert_close(ckpt[1][n], plain[1][n], rtol=1e-5, atol=1e-6, msg=n)


@torch.no_grad()
def test_int8_towers_stay_close():
    cfg, ref = _reference("coca_ViT-B-32")
    model = CLIP(cfg).eval()
    model.load_state_dict(convert_from_open_clip(ref.state_dict(), cfg))
    int8 = quantize_int8(copy.deepcopy(model))
    images, tokens = torch.randn(4, 3, 32, 32), _tokens()[:4]
    for encode, arg in (("encode_image", images), ("encode_text", tokens)):
        a, b = getattr(model, encode)(arg, normalize=True), getattr(int8, encode)(arg, normalize=True)
        cos = (a * b).sum(-1)
        assert cos.min() > 0.99 and not torch.equal(a, b), (encode, cos)
    a, b = model.caption_logits(images, tokens), int8.caption_logits(images, tokens)  # the decoder's blocks too
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99
